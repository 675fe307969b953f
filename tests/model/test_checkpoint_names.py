"""One set of checkpoint names for the local and the Transformer Engine specs (LLM and ViT), and
checkpoints written with the old local names still loading through every reader.

The TE model runs on ``testing.fake_te`` (megatron's real TE wrappers on a CPU stand-in with TE's
parameter names and ``_extra_state``). "Old names" checkpoints are written by the old writer itself:
the local spec without its ``sharded_state_dict_keys_map`` (``specs.LOCAL_TO_TE`` emptied), which
is what every checkpoint before the unified names held.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from v2pe_megatron.testing import fake_te

# Checkpoints written and read through megatron's torch_dist: seconds each, kept out of the quick loop.
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _old_names(monkeypatch):
    from v2pe_megatron.model import specs

    with monkeypatch.context() as m:
        m.setattr(specs, "LOCAL_TO_TE", {})
        yield


def _tiny():
    from v2pe_megatron.config import load_recipe

    return load_recipe(None, ["model.preset=tiny"]).model


def _by_checkpoint_name(model) -> dict[str, torch.Tensor]:
    from v2pe_megatron.model.checkpoint_names import checkpoint_name

    return {checkpoint_name(k): v.detach().clone() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _inputs(mc):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 500, (2, 32), generator=g)
    ids[0, 3:7] = mc.img_context_token_id
    return ids, torch.randn(1, 3, 56, 56, generator=g), torch.arange(32, dtype=torch.float64).expand(2, -1) * 0.5


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:6]


def test_local_checkpoint_loads_into_te_model_and_back(tmp_path):
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.checkpointing import load_model_weights, save_model_weights

    mc = _tiny()
    with model_parallel(1, 1), fake_te.installed():
        torch.manual_seed(0)
        local = build_model(mc, Layout(spec="local")).eval()
        torch.manual_seed(1)
        te = build_model(mc, Layout(spec="te")).eval()
        assert any("linear_qkv.layer_norm_bias" in k for k in te.state_dict())  # a TE ViT, LayerNorm biases
        assert any(k.endswith("linear_qkv._extra_state") for k in te.state_dict())
        save_model_weights(tmp_path / "local", local)
        load_model_weights(tmp_path / "local", te)
        _assert_same(_by_checkpoint_name(local), _by_checkpoint_name(te))
        ids, px, pos = _inputs(mc)
        ref = local.logits(ids, px, pos)
        got = te.logits(ids, px, pos)
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        # and back: a TE checkpoint (with its _extra_state objects) into a local model
        torch.manual_seed(2)
        other = build_model(mc, Layout(spec="local")).eval()
        save_model_weights(tmp_path / "te", te)
        load_model_weights(tmp_path / "te", other)
        _assert_same(_by_checkpoint_name(te), _by_checkpoint_name(other))


def test_one_name_per_norm_on_disk(tmp_path):
    """What the files hold: TE's names for both specs, none of the local module names."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.checkpointing import save_model_weights

    with model_parallel(1, 1):
        save_model_weights(tmp_path / "w", build_model(_tiny(), Layout(spec="local")))
    keys = set(load_sharded_metadata(str(tmp_path / "w")))
    for part in ("language_model", "vision_model"):
        assert f"{part}.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
        assert f"{part}.decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert "vision_model.decoder.layers.mlp.linear_fc1.layer_norm_bias" in keys
    assert not [k for k in keys if "input_layernorm" in k or "pre_mlp_layernorm" in k]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An HF checkpoint, imported once with today's names and once by the old writer."""
    from v2pe_megatron.convert.megatron import import_hf
    from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config

    d = tmp_path_factory.mktemp("names")
    tensors = remote_checkpoint(str(d / "hf"), tiny_model_config())
    import_hf(d / "hf", d / "new", progress=False)
    with pytest.MonkeyPatch.context() as m:
        with _old_names(m):
            import_hf(d / "hf", d / "old", progress=False)
    return d, tensors


def test_old_names_checkpoint_is_what_the_old_writer_wrote(converted):
    from megatron.core import dist_checkpointing

    d, _ = converted
    old = set(dist_checkpointing.load_tensors_metadata(str(d / "old")))
    new = set(dist_checkpointing.load_tensors_metadata(str(d / "new")))
    assert "language_model.decoder.layers.input_layernorm.weight" in old
    assert "vision_model.decoder.layers.pre_mlp_layernorm.bias" in old
    assert len(old) == len(new) and old != new


def test_old_names_load_into_both_specs(converted):
    """``load_model_weights`` (checkpoint.pretrained, v2pe-eval --ckpt, --verify): the same tensors as
    the checkpoint with today's names, into a local and into a TE model; a plain megatron load of the
    old names fails, which is what the mapping at load is for."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.hf_fixtures import tiny_model_config
    from v2pe_megatron.training.checkpointing import load_model_weights

    d, _ = converted
    mc = tiny_model_config()
    with model_parallel(1, 1), fake_te.installed():
        ref = build_model(mc, Layout(spec="local"))
        load_model_weights(d / "new", ref)
        want = _by_checkpoint_name(ref)
        for spec in ("local", "te"):
            m = build_model(mc, Layout(spec=spec))
            load_model_weights(d / "old", m)
            _assert_same(want, _by_checkpoint_name(m))
        with pytest.raises(CheckpointException, match="linear_qkv.layer_norm_weight from model not in state dict"):
            dist_checkpointing.load(build_model(mc, Layout(spec="local")).sharded_state_dict(), str(d / "old"))


def test_old_names_export_and_verify(converted, tmp_path):
    """``v2pe-convert export-hf`` (tensors by name, no model) and ``--verify`` read the old names."""
    from v2pe_megatron.convert.megatron import export_hf
    from v2pe_megatron.convert.safetensors_io import read_safetensors
    from v2pe_megatron.convert.verify import verify_pair

    d, tensors = converted
    export_hf(d / "old", tmp_path / "out", layout="remote-code", progress=False)
    back = read_safetensors(tmp_path / "out")
    _assert_same(tensors, back)
    res = verify_pair(d / "hf", d / "old", layout="remote")
    assert res["max_rel_logits_diff"] < 1e-5 and res["top1_agreement"] == 1.0


def _train_state(seed: int):
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training.engine import build_optimizer, wrap_ddp

    recipe = tiny.tiny_recipe("parallel.use_distributed_optimizer=true", "optimizer.name=adam", "optimizer.lr=0.01")
    torch.manual_seed(seed)
    model = tiny.build_language_model(recipe)
    ddp = wrap_ddp(model, model.config, use_distributed_optimizer=True)
    opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, use_distributed_optimizer=True)
    return recipe, model, ddp, opt


def _step(recipe, ddp, opt, seed: int) -> float:
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training.engine import train_step

    batches = tiny.synthetic_lm_batches(2, micro_batch_size=1, seq_length=32,
                                        vocab_size=recipe.model.language.vocab_size, seed=seed)
    return train_step([ddp], opt, tiny.lm_forward_step, iter(batches), num_microbatches=2, seq_length=32,
                      micro_batch_size=1).loss


def test_training_resume_reads_old_names_with_optimizer_state(tmp_path, monkeypatch):
    """``load_checkpoint``: weights and distributed-optimizer moments saved under the old names
    resume exactly: the next step matches the run that never stopped."""
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training import checkpointing as ckpt

    with model_parallel(1, 1, seed=3):
        with _old_names(monkeypatch):
            recipe, model, ddp, opt = _train_state(3)
            _step(recipe, ddp, opt, 100)
            ckpt.save_checkpoint(tmp_path / "ck", 1, [ddp], opt, extra={"note": "old"})
            from megatron.core import dist_checkpointing

            keys = set(dist_checkpointing.load_tensors_metadata(str(ckpt.iteration_dir(tmp_path / "ck", 1))))
            assert "optimizer.state.exp_avg.decoder.layers.input_layernorm.weight" in keys, sorted(keys)
            continued = _step(recipe, ddp, opt, 101)
            want = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        _, model2, ddp2, opt2 = _train_state(4)
        it, extra = ckpt.load_checkpoint(tmp_path / "ck", [ddp2], opt2)
        assert it == 1 and extra["note"] == "old"
        resumed = _step(recipe, ddp2, opt2, 101)
        got = {k: v for k, v in model2.state_dict().items() if torch.is_tensor(v)}
    assert resumed == continued
    _assert_same(want, got)
