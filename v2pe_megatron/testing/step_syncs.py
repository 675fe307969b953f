"""Host syncs per training step of the real training loop, by phase and by call site.

On CUDA the device itself reports them: ``torch.cuda.set_sync_debug_mode("warn")`` makes every call
that makes the host wait for the GPU (a value read back, a blocking copy either way, a stream
synchronize, an op whose output size depends on the data) raise the warning "called a
synchronizing CUDA operation"; each is counted with the Python stack it was raised from. Syncs in
the backward pass happen on autograd's device thread, whose warnings are replayed on the calling
thread when ``backward()`` returns (so they count, at the backward's call site). On the CPU (where
nothing syncs) :class:`testing.host_syncs.HostSyncCounter` counts the calls that would, which
proves the bookkeeping in ``tools/device_check.sh --dry-run``; there host work on host tensors (the
data loader, the batch preparation) counts too.

:func:`count_step_syncs` runs ``training.loop.train(recipe)`` and counts from the first step after
``warmup`` on; only complete steps are reported (the last step's tail ends with the run's teardown).
Two probes prove the counter sees what it must: one ``.item()`` at the start of every counted step,
and once, before training, a read-back inside a backward hook.

Phases, decided by the innermost frame of the stack that matches (:func:`phase_of`): the data
loader, the batch preparation (``training.forward.prepare_batch``), the forward/backward (megatron's
pipeline schedule: model, loss, backward, gradient finalize), the optimizer step
(``training.nonfinite.guarded_step`` and megatron's optimizer), the loss sum (the rest of
``engine.train_step``), the stop decision and skip counters (``training.loop``), the step meter,
tracking, the rest of the loop.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["SYNC_WARNING", "MODEL_PHASES", "phase_of", "count_step_syncs", "format_report"]

SYNC_WARNING = "called a synchronizing CUDA operation"
# What must not sync on a GPU: the model's forward and backward, and what feeds them inside the step.
MODEL_PHASES = ("forward/backward", "batch preparation", "data loader")

# (path fragment, function names or None for any) -> phase; the innermost frame that matches decides.
_RULES: list[tuple[str, Optional[tuple[str, ...]], str]] = [
    ("v2pe_megatron/testing/step_syncs.py", ("_probe", "_probe_backward", "<lambda>"), "probe"),
    ("v2pe_megatron/training/forward.py", ("prepare_batch", "_prepared_once"), "batch preparation"),
    ("v2pe_megatron/data/", None, "data loader"),
    ("megatron/core/pipeline_parallel/", None, "forward/backward"),
    ("v2pe_megatron/training/nonfinite.py", None, "optimizer step"),
    ("megatron/core/optimizer/", None, "optimizer step"),
    ("v2pe_megatron/training/engine.py", ("train_step",), "loss sum (train_step)"),
    ("v2pe_megatron/training/loop.py", ("_should_stop",), "stop decision"),
    ("v2pe_megatron/training/loop.py", ("_global_skips",), "skip counters"),
    ("v2pe_megatron/training/metrics.py", None, "step meter"),
    ("v2pe_megatron/training/tracking.py", None, "tracking"),
    ("v2pe_megatron/training/loop.py", None, "loop (other)"),
]


def phase_of(frames: list[traceback.FrameSummary]) -> str:
    """The phase of a sync raised with this stack (outermost frame first, as ``extract_stack``)."""
    for f in reversed(frames):
        path = f.filename.replace("\\", "/")
        for fragment, names, phase in _RULES:
            if fragment in path and (names is None or f.name in names):
                return phase
    return "other"


def _site(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch and this module: where the code asked for the value."""
    for f in reversed(frames):
        path = f.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith(("step_syncs.py", "host_syncs.py", "warnings.py")):
            continue
        if "v2pe_megatron/" in path:
            short = path[path.find("v2pe_megatron/"):]
        elif "/megatron/" in path:          # from site-packages or a wheel's --target folder
            short = path[path.find("/megatron/") + 1:]
        else:
            short = path.split("site-packages/")[-1]
        return f"{short}:{f.lineno} ({f.name})"
    return "?"


class _Recorder:
    def __init__(self) -> None:
        self.step: Optional[int] = None          # the step being counted (None: not counting)
        self.events: list[tuple[int, str, str]] = []   # (step, phase, site)

    def record(self, frames: list[traceback.FrameSummary]) -> None:
        if self.step is not None:
            self.events.append((self.step, phase_of(frames), _site(frames)))


def _probe(device: torch.device) -> None:
    torch.ones(1, device=device).item()


def _probe_backward(device: torch.device) -> None:
    x = torch.ones(2, device=device, requires_grad=True)
    x.register_hook(lambda g: g * g.sum().item())
    (x * 2).sum().backward()


@contextlib.contextmanager
def _cuda_counting(rec: _Recorder) -> Iterator[Callable[[], None]]:
    """Sync-debug warnings -> ``rec``; yields a function that (re)arms the filter and the mode."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                rec.record(traceback.extract_stack()[:-1])
            else:
                shown(message, category, filename, lineno, file, line)

        def arm() -> None:
            # Re-inserted at every step: a filter added later (a library's "ignore") would hide it.
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")

        try:
            yield arm
        finally:
            torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _cpu_counting(rec: _Recorder) -> Iterator[Callable[[], None]]:
    """``HostSyncCounter`` (active from the first ``arm()``) -> ``rec``."""
    from v2pe_megatron.testing.host_syncs import HostSyncCounter

    class Counter(HostSyncCounter):
        def _record(self, name: str) -> None:
            super()._record(name)
            rec.record(traceback.extract_stack()[:-1])

    counter, entered = Counter(), []

    def arm() -> None:
        if not entered:
            counter.__enter__()
            entered.append(True)

    try:
        yield arm
    finally:
        if entered:
            counter.__exit__(None, None, None)


def count_step_syncs(recipe: Any, *, warmup: int = 3) -> dict[str, Any]:
    """Run ``recipe`` through the training loop, counting host syncs from step ``warmup + 1`` on.

    Returns ``backend`` ("cuda sync-debug" or "cpu counter"), ``steps`` (the complete counted
    steps), ``per_step`` (phase -> syncs per step, probes left out), ``sites`` (phase -> site ->
    syncs per step), ``probe_steps`` (forward probes seen, one per counted step started) and
    ``probe_backward`` (syncs seen from the backward-hook probe: 1), ``losses``."""
    from v2pe_megatron.runtime.distributed import device as rank_device
    from v2pe_megatron.training import loop

    if recipe.train.steps < warmup + 2:
        raise ValueError(f"train.steps={recipe.train.steps}: needs >= warmup + 2 = {warmup + 2} "
                         "(warm-up steps, then at least one complete counted step)")
    cuda = torch.cuda.is_available()
    rec = _Recorder()
    calls = [0]
    train_step = loop.train_step
    with (_cuda_counting if cuda else _cpu_counting)(rec) as arm:
        def counted_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == warmup + 1:
                arm()
                rec.step = -1                    # the backward probe, once
                _probe_backward(rank_device())
            if calls[0] > warmup:
                arm()
                rec.step = calls[0]
                _probe(rank_device())
            return train_step(*args, **kwargs)

        loop.train_step = counted_step
        try:
            summary = loop.train(recipe)
        finally:
            loop.train_step = train_step
            rec.step = None
    complete = list(range(warmup + 1, calls[0]))  # the last step's tail is the run's teardown
    n = max(len(complete), 1)
    per_step: dict[str, float] = collections.Counter()
    sites: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    probes = collections.Counter()
    for step, phase, site in rec.events:
        if step == -1:
            probes["backward"] += phase == "probe"
        elif step in complete:
            if phase == "probe":
                probes["forward"] += 1
                continue
            per_step[phase] += 1 / n
            sites[phase][site] += 1 / n
    return {"backend": "cuda sync-debug" if cuda else "cpu counter", "steps": len(complete),
            "per_step": dict(per_step), "sites": {k: dict(v) for k, v in sites.items()},
            "probe_steps": probes["forward"], "probe_backward": probes["backward"],
            "losses": list(summary.losses)}


def format_report(res: dict[str, Any]) -> str:
    """A few lines for people; the first starts ``syncs:`` (the device check's summary line)."""
    per = res["per_step"]
    model = sum(per.get(p, 0.0) for p in MODEL_PHASES)
    rest = ", ".join(f"{p} {v:g}" for p, v in sorted(per.items(), key=lambda kv: -kv[1]) if p not in MODEL_PHASES)
    lines = [f"syncs: {sum(per.values()):g} per step over {res['steps']} steps ({res['backend']}): "
             f"forward/backward {per.get('forward/backward', 0.0):g}, batch preparation "
             f"{per.get('batch preparation', 0.0):g}, data loader {per.get('data loader', 0.0):g}"
             f"{'; ' + rest if rest else ''}; probes seen {res['probe_steps']}/{res['steps']}"
             f"+{res['probe_backward']} backward"]
    for phase, where in sorted(res["sites"].items()):
        for site, v in sorted(where.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {phase:<22} {v:5g} per step  {site}")
    if not model:
        lines.append("  (no sync in the model's forward/backward)")
    return "\n".join(lines)
