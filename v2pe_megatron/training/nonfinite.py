"""Skip the optimizer update of a step whose loss or gradient norm is not finite.

megatron's ``optimizer.step()`` only looks for inf/NaN when a loss scaler exists (fp16): in fp32 and
in bf16 it clips by a NaN norm and steps, writing NaN into every weight and into Adam's moments. So
without a scaler the norm is computed first (``prepare_grads`` + ``get_grad_norm``: both idempotent,
and the norm is reduced over the model- and data-parallel groups so every rank decides the same) and
``step()`` only runs when it is finite. A skipped step changes nothing: no weight, no Adam moment, no
Adam step count (the caller also leaves the LR schedule where it is); the next step zeroes the
gradient buffers as usual. The price is a second grad-norm computation on normal steps when
``clip_grad`` > 0, small next to a step. With fp16's scaler megatron's own found-inf path skips.
"""

from __future__ import annotations

import math
from typing import Optional


def _has_grad_scaler(optimizer) -> bool:
    return any(getattr(o, "grad_scaler", None) is not None
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def guarded_step(optimizer, loss: float) -> tuple[bool, Optional[float]]:
    """``(updated, grad_norm)``; ``loss`` must be the same on every rank (the reduced batch loss)."""
    if _has_grad_scaler(optimizer):
        ok, grad_norm, _ = optimizer.step()
        return bool(ok) and math.isfinite(loss), grad_norm
    if not math.isfinite(loss):
        return False, None
    optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm())
    if not math.isfinite(norm):
        return False, norm
    ok, grad_norm, _ = optimizer.step()
    return bool(ok), grad_norm
