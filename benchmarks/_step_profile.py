"""Where a training step's CPU time goes, by part of the model, for ``benchmarks/step.py --profile``.

One step runs under ``torch.profiler`` (CPU). Every operator's self time is charged to a category:

- forward: the innermost categorised module whose forward it ran in (forward pre/post hooks open a
  ``record_function`` scope per categorised module; :func:`module_category` names them from the
  module's path and class, the same rules for our megatron modules and transformers' ones), or a
  scope the step opened itself (loss, optimizer, DDP grad buffers, data movement);
- backward: the category of the forward operator that made the autograd node (the profiler's
  ``sequence_nr`` links a node's ``evaluate_function`` event to the forward op that recorded it);
- by operator, whatever the scope: the SDPA kernels (forward and backward) are "attention core
  (SDPA)"; ``AccumulateGrad`` nodes (and the hooks that run on them: megatron DDP copies each
  ``.grad`` into its contiguous ``main_grad`` buffer there) are "grad accumulation".

"untraced" is the step's wall time less the operators' self time: Python between operators,
scheduling, waits. Operators of intra-op worker threads are not events of their own, so the sum of
self times is the calling threads' wall time inside operators, comparable across the two sides.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "cat::"
ORDER = ("attention core (SDPA)", "attention: rotary, q/k/v reshapes", "attention projections", "MLP", "norms",
         "rotary/positions (tables)", "embeddings, projector", "LM head (logits)", "loss", "grad accumulation",
         "optimizer", "DDP grad buffers (zero, sync)", "data movement", "other ops", "untraced")

_ATTN_LINEAR = re.compile(r"(^|\.)(linear_qkv|linear_proj|q_proj|k_proj|v_proj|o_proj|projection_layer|qkv|proj)$")


def module_category(path: str, cls: str) -> str | None:
    """The category of a module's own operators, from its dotted ``path`` and class name; None for
    containers (layers, blocks, whole models), whose operators fall to the nearest categorised
    ancestor (or "other ops")."""
    p, c = path.lower(), cls.lower()
    last = p.rsplit(".", 1)[-1]
    if "rotary" in c or "rotary" in last:
        return "rotary/positions (tables)"
    if "norm" in c or "norm" in last:
        return "norms"
    if last == "core_attention" or "dotproductattention" in c:
        return "attention core (SDPA)"
    in_attn = any(x in ("self_attention", "self_attn", "attention", "attn") for x in p.split(".")[:-1])
    if in_attn and _ATTN_LINEAR.search(p):
        return "attention projections"
    if last in ("self_attention", "self_attn", "attention", "attn") or c.endswith("attention"):
        return "attention: rotary, q/k/v reshapes"
    if last == "mlp" or (c.endswith("mlp") and "projector" not in p):
        return "MLP"
    if last in ("output_layer", "lm_head"):
        return "LM head (logits)"
    if "embed" in last or "projector" in p or last in ("embeddings",):
        return "embeddings, projector"
    return None


@contextlib.contextmanager
def scoped(fn_owner, name: str, category: str):
    """``fn_owner.name`` wrapped in a ``record_function`` scope of ``category`` while inside."""
    orig = getattr(fn_owner, name)
    own = name in vars(fn_owner)

    def wrapped(*a, **k):
        with record_function(PREFIX + category):
            return orig(*a, **k)

    setattr(fn_owner, name, wrapped)
    try:
        yield
    finally:
        if own or not hasattr(type(fn_owner), name) or isinstance(getattr(type(fn_owner), name), property):
            setattr(fn_owner, name, orig)
        else:
            delattr(fn_owner, name)  # the instance attribute that shadowed the class's method


@contextlib.contextmanager
def module_scopes(model: torch.nn.Module):
    """Forward hooks that open a category scope around every categorised module."""
    handles = []
    for path, mod in model.named_modules():
        cat = module_category(path, type(mod).__name__)
        if cat is None:
            continue

        def pre(_m, _a, cat=cat):
            rf = record_function(PREFIX + cat)
            rf.__enter__()
            _m._bench_scopes = getattr(_m, "_bench_scopes", []) + [rf]

        def post(_m, _a, _o):
            _m._bench_scopes.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _op_category(name: str) -> str | None:
    n = name.lower()
    if "scaled_dot_product" in n or "flash_attention" in n:
        return "attention core (SDPA)"
    if "accumulategrad" in n:
        return "grad accumulation"
    return None


def categorize(events, wall_s: float) -> dict[str, float]:
    """Seconds per category (``ORDER``) from a profile's ``events()``."""
    fwd_cat: dict[int, str] = {}

    def scope_of(e):
        """(category, node sequence number) from the nearest ancestor that says."""
        p = e
        while p is not None:
            oc = _op_category(p.name)
            if oc:
                return oc, None
            if p.name.startswith(PREFIX):
                return p.name[len(PREFIX):], None
            if p.name.startswith("autograd::engine::evaluate_function"):
                return None, p.sequence_nr
            p = p.cpu_parent
        return None, None

    # forward ops first: which category made which autograd node
    resolved = []
    for e in events:
        cat, seq = scope_of(e)
        resolved.append((e, cat, seq))
        if cat is not None and e.sequence_nr is not None and e.sequence_nr >= 0 and not e.is_async:
            fwd_cat.setdefault(e.sequence_nr, cat)
    out: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e, cat, seq in resolved:
        if e.name.startswith(PREFIX) and e.self_cpu_time_total == 0:
            continue
        if cat is None and seq is not None:
            cat = fwd_cat.get(seq)
        out[cat or "other ops"] += e.self_cpu_time_total / 1e6
        ops[cat or "other ops"][e.name] += e.self_cpu_time_total / 1e6
    traced = sum(out.values())
    out["untraced"] = max(0.0, wall_s - traced)
    top = {k: sorted(v.items(), key=lambda kv: -kv[1])[:6] for k, v in ops.items()}
    return {k: out.get(k, 0.0) for k in ORDER}, top


def profiled(step_fn, model: torch.nn.Module, scopes: list[tuple[object, str, str]]):
    """Run ``step_fn()`` once under the profiler with the module scopes and the given
    ``(owner, attribute, category)`` function scopes; returns (step_fn's result, categories)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(module_scopes(model))
        for owner, attr, cat in scopes:
            stack.enter_context(scoped(owner, attr, cat))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            res = step_fn()
            wall = time.perf_counter() - t0
    cats, top = categorize(prof.events(), wall)
    return res, cats, top, wall


def table(ours: dict[str, float], theirs: dict[str, float], wall_o: float, wall_t: float) -> str:
    rows = ["| part of the step | ours (s) | transformers (s) | ours - transformers (s) |", "|---|---|---|---|"]
    for k in ORDER:
        rows.append(f"| {k} | {ours[k]:.3f} | {theirs[k]:.3f} | {ours[k] - theirs[k]:+.3f} |")
    rows.append(f"| **step (wall, profiled)** | {wall_o:.3f} | {wall_t:.3f} | {wall_o - wall_t:+.3f} |")
    return "\n".join(rows)
