"""A compiled loop for the weighted sum of float32 updates, where numba is installed.

FedAvg's fold reads every update once; it is bound by memory only if it
widens, multiplies and adds in one pass. No library does that over a batch of
separate (memory-mapped) arrays: numpy has no such loop, and its widening
cast alone takes 1.5x the time of reading the inputs; `np.einsum` and BLAS
work in one dtype, so the inputs would first be widened into a copy; numexpr
fuses the expression but runs it one operation at a time over blocks of
temporaries, and took 5.9x the time of reading 16 float32 updates on one
thread. So the loop is written here, in Python that numba compiles: for each
block of 2048 elements (16 KiB of float64 sums, in L1), it adds eight updates
at a time into the block's sums, then adds the sums to the accumulator, which
is thus read and written once per batch.

numba is optional (the `server` and `sim` extras, so `all` too): `load`
returns None without it, and `fedcore.fedavg` then folds with numpy alone.
Importing numba and loading the compiled loop from its on-disk cache take
about a second, and compiling it the first time a few seconds, so `load` is
called on the first fold of a large tensor only, never on import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import numpy as np

from fedcore.parameters import Array

__all__ = ["WeightedSum", "load"]

# Elements per block: the block's float64 sums (16 KiB) stay in L1 (32 KiB
# per core) while the inputs stream through.
_BLOCK = 2048

WeightedSum = Callable[[Array, tuple[Array, ...], Array, int, bool], None]
"""`(acc, inputs, weights, offset, overwrite)`: add a weighted sum of inputs to `acc`.

`acc[j]` gains `sum(weights[k] * float64(inputs[k][offset + j]))` over
`k < len(weights)`, computed in float64, or is set to that sum if
`overwrite`. `acc` is a float64 vector (a range of an accumulator), `weights`
float64; `inputs` is a tuple of `fedavg`'s batch size of aligned, contiguous,
read-only float32 vectors at least `offset + len(acc)` long, padded past
`len(weights)` with any of them: always the same length, so that numba
compiles the loop once.
"""


@functools.cache
def load() -> WeightedSum | None:
    """Return the compiled weighted sum, or None where numba is not installed."""
    try:
        # Here, not at the top: importing numba takes 0.4 s.
        import numba
    except ImportError:
        return None
    # nogil: `fedavg`'s threads run the loop in parallel over separate ranges.
    # cache: compiled once per installation, not once per process.
    try:
        compiled = numba.njit(nogil=True, cache=True)(_weighted_sum)
    except RuntimeError:
        # numba found no writable cache directory (a read-only install and
        # home); compile once per process instead.
        compiled = numba.njit(nogil=True)(_weighted_sum)
    return cast(WeightedSum, compiled)


def _weighted_sum(
    acc: Array, inputs: tuple[Array, ...], weights: Array, offset: int, overwrite: bool
) -> None:
    """Add `sum(weights[k] * inputs[k][offset:][:len(acc)])` to `acc`, or set `acc` to it.

    Written for numba (see `WeightedSum`): one function with explicit loops,
    which LLVM vectorizes; it also runs, slowly, as plain Python.
    """
    sums = np.empty(_BLOCK, dtype=np.float64)
    for start in range(0, acc.size, _BLOCK):
        block = sums[: min(_BLOCK, acc.size - start)]
        lo, hi = offset + start, offset + start + block.size
        block[:] = 0.0
        first = 0
        # Eight updates per pass over the block: a pass loads and stores the
        # block's sums, which would otherwise cost more than the inputs.
        while first + 8 <= weights.size:
            x0, w0 = inputs[first][lo:hi], weights[first]
            x1, w1 = inputs[first + 1][lo:hi], weights[first + 1]
            x2, w2 = inputs[first + 2][lo:hi], weights[first + 2]
            x3, w3 = inputs[first + 3][lo:hi], weights[first + 3]
            x4, w4 = inputs[first + 4][lo:hi], weights[first + 4]
            x5, w5 = inputs[first + 5][lo:hi], weights[first + 5]
            x6, w6 = inputs[first + 6][lo:hi], weights[first + 6]
            x7, w7 = inputs[first + 7][lo:hi], weights[first + 7]
            for j in range(block.size):
                # float64 times float32 is float64: every product and sum is
                # exact to float64 rounding.
                block[j] += ((w0 * x0[j] + w1 * x1[j]) + (w2 * x2[j] + w3 * x3[j])) + (
                    (w4 * x4[j] + w5 * x5[j]) + (w6 * x6[j] + w7 * x7[j])
                )
            first += 8
        for k in range(first, weights.size):
            x, w = inputs[k][lo:hi], weights[k]
            for j in range(block.size):
                block[j] += w * x[j]
        target = acc[start : start + block.size]
        if overwrite:
            # The accumulator's first batch: no zeros to read (see `fedavg`).
            target[:] = block
        else:
            for j in range(block.size):
                target[j] += block[j]
