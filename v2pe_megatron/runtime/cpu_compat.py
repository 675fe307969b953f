"""Placeholder: filled in by the foundation work (CPU patches for megatron-core)."""

_ACTIVE = False


def activate() -> None:
    global _ACTIVE
    _ACTIVE = True
