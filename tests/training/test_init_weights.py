"""Initial weights (training/init_weights.py): a function of the model and the seed only.

- Quick: a shard's values are the slice of the whole tensor's (any rows and columns, also across
  tile edges), padding rows do not change the real ones, the seed, the key and the layer change them;
  every checkpoint key of the local and the TE spec has a rule; each parameter's distribution is the
  one megatron's (and torch's) own initialisation gives it (two-sample Kolmogorov-Smirnov against the
  values megatron draws, mean and std; constants exactly).
- Slow (4 gloo ranks, one spawn): 1 rank (DP=4) vs TP=2, PP=2, TP=2xPP=2, PP=2 x 2 virtual stages,
  TP=4 (vocabulary padded), PP=4, CP=2 and TP=2xCP=2 give the same global tensors, bit for bit; and on a
  model 20 times its largest tensor at TP=2xPP=2 (each rank holds a quarter), the init's peak extra
  resident memory (VmHWM) on every rank is about one band, below the rank's largest parameter shard,
  a rank draws about its shard, and no rank's memory grows by half the model from before the build
  to the end of the init.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed
from v2pe_megatron.training.init_weights import Init, band_values, init_kind, tile_shape, values

NORMAL = Init("normal", 0.02)


# ------------------------------------------------------------------------------------------------
# The draw itself (pure functions)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(700, 600), (1000, 64), (300,), (64, 3, 14, 14), (1, 17, 64)])
def test_a_region_is_the_slice_of_the_whole(shape):
    whole = values(5, "k", NORMAL, shape)
    assert whole.shape == shape and whole.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        a = int(torch.randint(0, shape[0], (1,), generator=g))
        b = int(torch.randint(a + 1, shape[0] + 1, (1,), generator=g))
        region = [slice(a, b)]
        if len(shape) == 2:
            c = int(torch.randint(0, shape[1], (1,), generator=g))
            d = int(torch.randint(c + 1, shape[1] + 1, (1,), generator=g))
            region.append(slice(c, d))
        got = values(5, "k", NORMAL, shape, tuple(region))
        assert torch.equal(got, whole[tuple(region)]), (shape, region)
    # shards that cut exactly at tile edges, and the uniform and constant kinds
    tr, tc = tile_shape(int(np.prod(shape[1:])) if len(shape) > 1 else 1)
    if shape[0] > tr:
        assert torch.equal(values(5, "k", NORMAL, shape, (slice(tr, shape[0]),)), whole[tr:])
    u = values(5, "k", Init("uniform", 0.5), shape)
    assert float(u.abs().max()) <= 0.5 and float(u.std()) > 0.25
    assert torch.equal(values(5, "k", Init("constant", 0.1), shape), torch.full(shape, 0.1))


def test_padding_rows_do_not_change_the_real_rows():
    """The vocabulary is padded to a multiple of TP: the rows it has in common do not move."""
    for vocab, padded in ((509, 510), (509, 512), (1000, 1024)):
        assert torch.equal(values(1, "emb", NORMAL, (vocab, 96)), values(1, "emb", NORMAL, (padded, 96))[:vocab])


def test_a_prefix_of_a_band_is_drawn_alike():
    """A rank draws a band only up to its last row: the stream is filled row by row."""
    full = band_values(3, "t", NORMAL, 600, (0, 256), (0, 600))
    assert torch.equal(torch.from_numpy(band_values(3, "t", NORMAL, 600, (10, 40), (100, 590))),
                       torch.from_numpy(full[10:40, 100:590]))
    with pytest.raises(ValueError, match="cross a band"):
        band_values(3, "t", NORMAL, 600, (250, 260), (0, 600))


def test_seed_key_and_layer_each_change_the_values():
    base = values(1, "a.weight[0]", NORMAL, (64, 64))
    for other in (values(2, "a.weight[0]", NORMAL, (64, 64)), values(1, "b.weight[0]", NORMAL, (64, 64)),
                  values(1, "a.weight[1]", NORMAL, (64, 64))):
        assert not torch.equal(base, other)
        assert abs(float(torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1])) < 0.05
    assert torch.equal(base, values(1, "a.weight[0]", NORMAL, (64, 64)))
    # tiles of one tensor are not copies of each other
    big = values(1, "c", NORMAL, (512, 512))
    assert not torch.equal(big[:256, :256], big[256:, :256]) and not torch.equal(big[:256, :256], big[:256, 256:])


def test_every_key_of_both_specs_has_a_rule():
    prefix = "language_model.decoder.layers."
    expected = {
        prefix + "input_layernorm.weight": "ones",                                  # local spec
        prefix + "self_attention.linear_qkv.layer_norm_weight": "ones",             # TE / renamed
        prefix + "mlp.linear_fc1.layer_norm_weight": "ones",
        "vision_model.decoder.layers.self_attention.linear_qkv.layer_norm_bias": "zeros",
        "vision_model.decoder.layers.pre_mlp_layernorm.bias": "zeros",
        "language_model.decoder.final_layernorm.weight": "ones",
        prefix + "self_attention.q_layernorm.weight": "ones",
        "projector.layer_norm.weight": "ones",
        prefix + "self_attention.linear_qkv.weight": "init_method",
        prefix + "self_attention.linear_qkv.bias": "zeros",
        prefix + "self_attention.linear_proj.weight": "output_layer_init_method",
        prefix + "mlp.linear_fc1.weight": "init_method",
        prefix + "mlp.linear_fc2.weight": "output_layer_init_method",
        "language_model.embedding.word_embeddings.weight": "embedding_init_method",
        "language_model.output_layer.weight": "init_method",
        "projector.linear_1.weight": "init_method",
        "projector.linear_2.weight": "output_layer_init_method",
        "vision_model.decoder.layers.mlp_bda.ls": "layer_scale",
        "vision_model.embeddings.class_embedding": "vision_embedding",
        "vision_model.embeddings.patch_embedding.bias": "conv_default",
    }
    assert {k: init_kind(k) for k in expected} == expected
    with pytest.raises(KeyError, match="language_model.new_thing.weight"):
        init_kind("language_model.new_thing.weight")


# ------------------------------------------------------------------------------------------------
# initialize() on a built model
# ------------------------------------------------------------------------------------------------
def _init_and_compare(overrides: tuple[str, ...], seed: int, threads: int) -> int:
    """Build the tiny model (1 rank, this machine's device), initialize it and compare every shard
    with ``values`` cast to the parameter's dtype, exactly. Returns the number of values checked."""
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe
    from v2pe_megatron.training.init_weights import initialize, shards

    recipe = tiny_recipe(*overrides)
    with model_parallel(seed=0):
        model = build_model(recipe.model, layout_of(recipe))
        report = initialize(model, seed, threads=threads)
        checked = 0
        for sh in shards(model):
            want = values(seed, sh.name, sh.init, sh.shape, sh.region).to(sh.data.dtype)
            assert torch.equal(sh.data.detach().cpu(), want), sh.name
            checked += sh.data.numel()
        assert checked == report.elements == sum(p.numel() for p in model.parameters())
    return checked


@pytest.mark.parametrize("overrides,threads", [((), 1), ((), 3), (("model.dtype=bf16",), 2),
                                               (("model.language.tie_word_embeddings=true",), 1)])
def test_initialize_writes_the_drawn_values_into_every_parameter(overrides, threads):
    """fp32 and bf16 (rounded once from the fp32 draw), any thread count, tied embeddings."""
    assert _init_and_compare(overrides, 5, threads) > 300_000


@pytest.mark.gpu
def test_on_cuda_the_same_values_as_on_the_host():
    assert torch.cuda.is_available()
    _init_and_compare((), 5, 2)
    _init_and_compare(("model.dtype=bf16",), 5, 2)


# ------------------------------------------------------------------------------------------------
# Against megatron's own initialisation
# ------------------------------------------------------------------------------------------------
def _by_key(model) -> dict[str, torch.Tensor]:
    """Every value of the model by checkpoint key (all layers of a key together), float64."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    out: dict[str, list[torch.Tensor]] = {}
    for st in nested_values(sd):
        if isinstance(st, ShardedTensor):
            out.setdefault(st.key, []).append(st.data.detach().double().flatten().clone())
    return {k: torch.cat(v) for k, v in out.items()}


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a.numpy()), np.sort(b.numpy())
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / a.size
                        - np.searchsorted(b, grid, side="right") / b.size).max())


def test_each_parameter_has_the_distribution_megatron_gives_it():
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe
    from v2pe_megatron.training.init_weights import initialize

    # 6 LLM layers and 3 ViT layers: the output projections' std (0.02 / sqrt(2 L)) differs per tower.
    recipe = tiny_recipe("model.language.num_layers=6", "model.vision.num_layers=3",
                         "model.vision.layer_scale_init=0.3")
    with model_parallel(seed=3):
        model = build_model(recipe.model, layout_of(recipe))  # megatron's (and torch's) own init
        theirs = _by_key(model)
        report = initialize(model, 11)
        ours = _by_key(model)
    assert report.elements == sum(p.numel() for p in model.parameters())
    assert set(ours) == set(theirs)
    kinds = set()
    for key, t in theirs.items():
        o, kind = ours[key], init_kind(key)
        kinds.add(kind)
        if kind in ("ones", "zeros", "layer_scale"):
            assert torch.equal(o, t), key  # megatron's constants, exactly
            continue
        n, m = o.numel(), t.numel()
        # alpha = 1e-6 critical value of the two-sample KS statistic
        assert _ks(o, t) < 2.69 * ((n + m) / (n * m)) ** 0.5, (key, _ks(o, t))
        se = (1 / (2 * n) + 1 / (2 * m)) ** 0.5
        assert abs(float(o.std() / t.std()) - 1) < 5 * se, (key, float(o.std()), float(t.std()))
        assert abs(float(o.mean())) < 5 * float(t.std()) / n**0.5, (key, float(o.mean()))
    assert kinds == {"ones", "zeros", "layer_scale", "init_method", "output_layer_init_method",
                     "embedding_init_method", "conv_default", "vision_embedding"}
    assert float(ours["language_model.decoder.layers.self_attention.linear_proj.weight"].std()) == \
        pytest.approx(0.02 / 12**0.5, rel=0.05)
    assert float(ours["projector.linear_2.weight"].std()) == pytest.approx(0.02 / 6**0.5, rel=0.1)
    assert torch.all(ours["vision_model.decoder.layers.self_attn_bda.ls"] == float(np.float32(0.3)))


# ------------------------------------------------------------------------------------------------
# Layouts and memory (4 gloo ranks, one spawn for both)
# ------------------------------------------------------------------------------------------------
# Tiny model with 4 query groups (TP=4) and a vocabulary that TP=2 and TP=4 pad (509 -> 510, 512).
EQUAL_MODEL = ("model.language.vocab_size=509", "model.language.num_query_groups=4")
LAYOUTS = {  # name: (tp, pp, virtual_pp, cp)
    "1rank": (1, 1, 1, 1), "tp2": (2, 1, 1, 1), "pp2": (1, 2, 1, 1), "tp2pp2": (2, 2, 1, 1),
    "pp2vpp2": (1, 2, 2, 1), "tp4": (4, 1, 1, 1), "pp4": (1, 4, 1, 1), "cp2": (1, 1, 1, 2), "tp2cp2": (2, 1, 1, 2),
}
# 20 M parameters (80 MB in fp32); its largest tensor, one layer's fc1, is 1 M values (4 MB; 2 MB per TP=2 shard).
MEMORY_MODEL = ("model.language.vocab_size=509", "model.language.hidden_size=512", "model.language.num_layers=8",
                "model.language.ffn_hidden_size=1024", "model.language.num_attention_heads=8",
                "model.language.num_query_groups=4")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Restart VmHWM from VmRSS; returns VmRSS (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _build(model_overrides, tp, pp, vpp, cp, seed=1234):
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import initialize_model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe

    recipe = tiny_recipe(*model_overrides, f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}",
                         f"parallel.virtual_pp={vpp}")
    initialize_model_parallel(tp, pp, cp, seed=seed, vpp=vpp)
    layout = layout_of(recipe)
    return [build_model(recipe.model, layout, vp_stage=i if vpp > 1 else None) for i in range(vpp)]


def _shards(models) -> list[tuple]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    out = []
    for m in models:
        sd = m.sharded_state_dict()
        apply_factories(sd)
        out += [(st.key, tuple(st.global_offset), tuple(st.global_shape), st.prepend_axis_num,
                 st.data.detach().clone()) for st in nested_values(sd) if isinstance(st, ShardedTensor)]
    return out


def _rank(seed: int) -> dict:
    import ctypes
    import gc

    from v2pe_megatron.model.internvl import parameter_count
    from v2pe_megatron.runtime.distributed import destroy_model_parallel
    from v2pe_megatron.testing.tiny import tiny_recipe
    from v2pe_megatron.training.init_weights import initialize

    torch.set_num_threads(1)
    out = {"layouts": {}}
    for name, (tp, pp, vpp, cp) in LAYOUTS.items():
        models = _build(EQUAL_MODEL, tp, pp, vpp, cp)
        initialize(models, seed)
        out["layouts"][name] = _shards(models)
        del models
        destroy_model_parallel()

    # Memory: the peak of the build and of the init over the resident size before the build, and the
    # init's own peak over what the built shard holds.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before_build = _reset_peak()
    models = _build(MEMORY_MODEL, 2, 2, 1, 1)
    build_peak = _status_kib("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before_init = _reset_peak()
    report = initialize(models, seed)
    init_peak = _status_kib("VmHWM")
    params = [p for m in models for p in m.parameters()]
    out["memory"] = {"init_peak_extra": (init_peak - before_init) * 1024,
                     "growth_since_build": (max(build_peak, init_peak) - before_build) * 1024,
                     "shard_bytes": sum(p.numel() * p.element_size() for p in params),
                     "largest_local_param_bytes": max(p.numel() * p.element_size() for p in params),
                     "band_bytes": report.largest_band_bytes, "drawn": report.drawn, "elements": report.elements,
                     "model_bytes": 4 * parameter_count(tiny_recipe(*MEMORY_MODEL).model)}
    destroy_model_parallel()
    return out


def _assemble(shards: list[tuple]) -> dict[str, torch.Tensor]:
    """Global tensors from every rank's shards; replicas must agree; every element must be covered."""
    full: dict[str, torch.Tensor] = {}
    for key, offset, shape, _npre, data in shards:
        t = full.setdefault(key, torch.full(shape, float("nan")))
        npre = len(shape) - data.dim()
        idx = tuple(offset[:npre]) + tuple(slice(o, o + n) for o, n in zip(offset[npre:], data.shape))
        seen = t[idx]
        assert torch.isnan(seen).all() or torch.equal(seen, data), f"{key}: replicas differ"
        t[idx] = data
    for key, t in full.items():
        assert not torch.isnan(t).any(), f"{key}: not every element is held by some rank"
    return full


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_rank, 4, 17, timeout=600)


@pytest.mark.slow
def test_every_layout_starts_from_the_same_weights(four_ranks):
    per_layout = {name: _assemble([s for r in four_ranks for s in r["layouts"][name]]) for name in LAYOUTS}
    ref = per_layout["1rank"]
    assert len(ref) > 30
    for name, got in per_layout.items():
        assert set(got) == set(ref), name
        for key, t in ref.items():
            g = got[key]
            if g.shape != t.shape:  # vocab padding: the real rows agree, the padded rows exist
                assert "word_embeddings" in key or "output_layer" in key, (name, key, g.shape, t.shape)
                assert g.shape[0] > t.shape[0] == 509 and g.shape[1:] == t.shape[1:]
                g = g[: t.shape[0]]
            assert torch.equal(g, t), (name, key)
    assert per_layout["tp4"]["language_model.output_layer.weight"].shape[0] == 512


@pytest.mark.slow
def test_the_init_holds_one_band_not_the_model(four_ranks):
    for rank, r in enumerate(four_ranks):
        m = r["memory"]
        model_bytes = m["model_bytes"]
        print(f"rank {rank}: init peak extra {m['init_peak_extra'] / 2**20:.2f} MiB, band "
              f"{m['band_bytes'] / 2**20:.2f} MiB, largest local parameter "
              f"{m['largest_local_param_bytes'] / 2**20:.1f} MiB, shard {m['shard_bytes'] / 2**20:.1f} MiB, "
              f"peak growth from before the build {m['growth_since_build'] / 2**20:.1f} MiB, model {model_bytes / 2**20:.1f} MiB; drew {m['drawn']} for {m['elements']} values")
        assert 4 * m["largest_local_param_bytes"] < m["shard_bytes"] < model_bytes / 3
        # the init's own memory is about one band, under the largest parameter shard (let alone a tensor)
        assert m["init_peak_extra"] < m["largest_local_param_bytes"], (rank, m)
        # no rank ever held the whole model (build + init)
        assert m["growth_since_build"] < model_bytes / 2, (rank, m)
        # a rank draws about its shard, not the whole tensors it holds part of
        assert m["drawn"] < 1.1 * m["elements"], (rank, m)
