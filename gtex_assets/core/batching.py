"""Group partition keys into run-sized batches of contiguous ranges."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def contiguous_batches(
    ordered_keys: Sequence[str], wanted: Collection[str], max_size: int = 50
) -> list[list[str]]:
    """Split ``wanted`` into batches that are contiguous in ``ordered_keys`` and at most
    ``max_size`` long, so each batch can be one run over a partition range that contains
    nothing else (a range over dynamic partitions is defined by their order)."""
    if max_size < 1:
        raise ValueError("max_size must be >= 1")
    wanted = set(wanted)
    batches: list[list[str]] = []
    current: list[str] = []
    for key in ordered_keys:
        if key in wanted and len(current) < max_size:
            current.append(key)
            continue
        if current:
            batches.append(current)
        current = [key] if key in wanted else []
    if current:
        batches.append(current)
    return batches
