"""A training step's forward and backward read nothing back from the device per layer or per
sub-sample: the number of host syncs (``testing.host_syncs``: ``.item()``, ``.tolist()``, ``bool(t)``,
copies to the CPU, data-dependent shapes) of one step is the same with 2 or 4 LLM layers and with
few or many sub-samples per pack, on the local (sbhd) path and on the Transformer Engine (thd) path,
without and with context parallelism (ring attention, the image all-to-all), and under full
recompute.

The count covers megatron's forward-backward schedule: every layer, the loss, the backward with
its recompute. Paused: preparing the micro-batch (the CP split and the packing metadata are host
work on host tensors, before anything moves to the device) and the body of the CPU Transformer
Engine's attention (``testing.fake_te``: it checks TE's contract and computes in place of TE's
kernels; megatron's own TE wrappers around it are counted). Before V2PE's rotary moved
into the core attention, megatron's THD rotary path alone read the lengths back twice per
sub-sample per layer (234 reads for 4 layers and 25 sub-samples here).
"""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

SEQ = 128


def count_step(layers: int, rows: int, cp: int, te: bool, recompute: str, seed: int,
               probe: bool = False) -> tuple[int, int, dict]:
    """Host syncs of one training step's forward-backward; (count, sub-samples, where). ``probe``: a
    control that reads one value back in every layer's forward and backward (hooks), so the count
    must be 2 x layers x micro-batches: the counter sees the schedule, the layers and the backward."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import contextlib

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import fake_te
    from v2pe_megatron.testing.host_syncs import HostSyncCounter
    from v2pe_megatron.testing.tiny import synthetic_packs
    from v2pe_megatron.training import engine, forward
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp

    recipe = load_recipe(None, ["model.preset=tiny", f"data.seq_length={SEQ}", f"model.language.num_layers={layers}",
                                f"parallel.cp={cp}", "optimizer.name=sgd", f"train.recompute={recompute}"])
    counter = HostSyncCounter()

    def counted_fb(*args, **kwargs):
        with counter:
            return get_forward_backward_func()(*args, **kwargs)

    prepare, te_kernel = forward.prepare_batch, fake_te.DotProductAttention.forward

    def paused_prepare(*args, **kwargs):
        with counter.paused():
            return prepare(*args, **kwargs)

    def paused_te_kernel(self, *args, **kwargs):
        with counter.paused():
            return te_kernel(self, *args, **kwargs)

    # fp32 attention on the TE path: the CPU has no bf16 speed to gain, and counting does not need it
    with model_parallel(cp=cp), (fake_te.installed(fp32_attention=True) if te else contextlib.nullcontext()):
        layout = Layout.from_config(recipe.parallel, world_size=torch.distributed.get_world_size(),
                                    spec="te" if te else "local")
        torch.manual_seed(seed)
        model = build_model(recipe.model, layout, recompute=recompute)
        if probe:
            for layer in model.language_model.decoder.layers:
                layer.register_forward_pre_hook(lambda mod, args, kwargs: (kwargs["hidden_states"].sum().item(), None)[1],
                                                with_kwargs=True)
                layer.register_full_backward_hook(lambda mod, gin, gout: (gout[0].sum().item(), None)[1])
        ddp = wrap_ddp(model, model.config)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, lr=0.0)
        batches = synthetic_packs(2, rows=rows, seq_length=SEQ, pad_multiple=2 * cp, seed=seed)
        engine.get_forward_backward_func, forward.prepare_batch = (lambda: counted_fb), paused_prepare
        fake_te.DotProductAttention.forward = paused_te_kernel
        thd_calls = fake_te.DotProductAttention.calls.get("thd", 0)
        try:
            train_step([ddp], opt, forward.vlm_forward_step, iter(batches), num_microbatches=2, layout=layout,
                       seq_length=SEQ, micro_batch_size=rows)
        finally:
            engine.get_forward_backward_func, forward.prepare_batch = get_forward_backward_func, prepare
            fake_te.DotProductAttention.forward = te_kernel
        assert (fake_te.DotProductAttention.calls.get("thd", 0) > thd_calls) == te  # the path we meant ran
    subs = sum(len(r) for b in batches for r in b.seq_lens)
    assert sum(b.num_images for b in batches) > 0  # the vision tower and the image merge ran
    return counter.count, subs, dict(counter.sites)


CASES = [  # (name, cp, Transformer Engine spec (thd) on testing.fake_te, recompute)
    ("local", 1, False, "none"), ("thd", 1, True, "none"), ("local_cp2", 2, False, "none"),
    ("thd_cp2", 2, True, "none"), ("local_full_recompute", 1, False, "full"),
]


def count_all(cases) -> dict:
    out = {"probe": count_step(2, 1, 1, False, "none", 11, probe=True)}
    for name, cp, te, recompute in cases:
        out[name] = [count_step(layers, rows, cp, te, recompute, seed)
                     for layers, rows, seed in ((2, 1, 11), (4, 1, 11), (4, 2, 12))]
    return out


@pytest.mark.timeout(600)
def test_host_syncs_per_step_do_not_grow_with_layers_or_sub_samples():
    results = run_distributed(count_all, 2, CASES, timeout=500)
    for rank, res in enumerate(results):
        assert res.pop("probe")[0] == 2 * 2 * 2, results  # 2 layers x (forward + backward) x 2 micro-batches
        for name, runs in res.items():
            counts = [c for c, _, _ in runs]
            subs = [s for _, s, _ in runs]
            assert subs[2] > subs[1], subs  # the third run packs more sub-samples
            # 2 vs 4 layers, few vs many sub-samples: the same count, and here none at all.
            assert counts == [0, 0, 0], (name, rank, counts, runs[-1][2])
