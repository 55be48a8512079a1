"""Comparing float results of two different computations of the same thing."""

from __future__ import annotations

from typing import Any

import torch


def assert_close_scaled(actual: Any, expected: Any, tol: float, msg: str | None = None,
                        scale: float | None = None) -> None:
    """Every element of `actual` is within `tol` x max(1, max |expected|) of `expected`.

    Two computations of the same value (fused or separate matmuls, SDPA or eager attention, another
    library, MKL's AVX2 or AVX-512 kernels) round differently, and the rounding error of a float sum
    scales with the magnitude of its terms, not of its result: an entry near zero gets the same
    allowance as the largest. The floor of 1 is the scale of normalised activations and weights that
    feed every output, so a small result does not demand a tolerance below its terms' rounding.
    `scale` replaces max |expected| where the values compared are smaller than those they were computed
    from (a log-probability near 0, from logits of magnitude 30).
    """
    want = torch.as_tensor(expected).detach().double()
    got = torch.as_tensor(actual).detach().double()
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 1.0
    scale = max(1.0, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale, msg=msg)
