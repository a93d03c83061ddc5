"""Small helpers shared across layers."""


def cdiv(a: int, b: int) -> int:
    """Ceiling of ``a / b`` for non-negative ``a`` and positive ``b`` (blocks needed for ``a`` tokens)."""
    return -(a // -b)
