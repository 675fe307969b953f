"""Long-context evaluation in the MM-NIAH style: ``v2pe-eval`` (docs/eval.md)."""
