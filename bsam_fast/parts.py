"""Splitting a batch into the m parts of an m-sharpness step (``BSAM.step_parts``)."""
from __future__ import annotations

from torch import Tensor


def split_batch(*tensors: Tensor, m: int) -> list[tuple[Tensor, ...]]:
    """Split tensors along dim 0 into m equal parts: [(x_0, y_0, ...), ...].

    Raises ValueError if m < 1 or the batch size is not divisible by m.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m: {m!r} (must be an integer >= 1)")
    if not tensors:
        raise ValueError("split_batch needs at least one tensor")
    size = tensors[0].shape[0]
    for t in tensors:
        if t.shape[0] != size:
            raise ValueError(f"split_batch: tensors disagree on the batch size "
                             f"({t.shape[0]} vs {size})")
    if size % m:
        raise ValueError(f"Invalid m: a batch of {size} is not divisible into m={m} parts")
    return list(zip(*(t.chunk(m) for t in tensors)))
