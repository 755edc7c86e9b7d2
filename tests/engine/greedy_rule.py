"""The cases README comparison rule (a uniquely named module, importable from the serving tests)."""

from __future__ import annotations


def matches_reference(got: list[int], want: list[int], margins: list[float]) -> bool:
    """Equal up to the first step whose top-2 logit margin in the reference is below 1e-3."""
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return min(margins[: step + 1]) < 1e-3
    return len(got) >= len(want)
