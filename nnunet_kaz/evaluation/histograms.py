"""Fine, order-preserving bin keys for streaming statistics that need ranks (adaptive ECE, AUROC).

Hand-written because the statistics must stream over cases with constant memory: exact ranks would need every
voxel of the dataset in memory and a sort. Instead each value is mapped to a fine bin whose key increases with
the value, taken from the float32 bit pattern (for non-negative floats the bit pattern, read as an integer, is
monotone in the value). Keeping the exponent and the top 11 mantissa bits gives bins whose width is 2^-11 of
the value itself: resolution follows the data down to 1e-38, where voxel probabilities and entropies pile up,
instead of the 1/65536 of a uniform grid that would lump every confident voxel into its first bin.
"""
from __future__ import annotations

import numpy as np

_SHIFT = 12                                  # drop 12 of float32's 23 mantissa bits: relative width 2^-11
_HALF = int(np.float32(0.5).view(np.int32)) >> _SHIFT
N_UNIT_KEYS = 2 * (_HALF + 1)                # keys of unit_interval_key
N_NONNEGATIVE_KEYS = (int(np.float32(np.inf).view(np.int32)) >> _SHIFT) + 1


def nonnegative_key(x: np.ndarray) -> np.ndarray:
    """Monotone fine-bin key (int32) in [0, N_NONNEGATIVE_KEYS) of finite values >= 0 (relative bin width
    2^-11)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    k = x32.view(np.int32) & 0x7FFFFFFF          # a new array; the & clears the sign bit of -0.0
    k >>= _SHIFT
    return k


def unit_interval_key(x: np.ndarray) -> np.ndarray:
    """Monotone fine-bin key (int32) in [0, N_UNIT_KEYS) of values in [0, 1], fine near both ends.

    Values up to 0.5 are keyed by their own bits, larger ones by the bits of 1 - x (exact in float32 for
    x >= 0.5), mirrored: the bin width is 2^-11 of min(x, 1 - x), so confidences of 0.9999 and 0.99999 stay
    apart just as 1e-4 and 1e-5 do. Written with in-place int32 steps: it runs on every voxel of a dataset.
    """
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    y = np.subtract(np.float32(1.0), x32)
    np.minimum(y, x32, out=y)                    # min(x, 1 - x); exactly x below 0.5
    k = y.view(np.int32)
    k &= 0x7FFFFFFF                              # clears the sign bit of -0.0
    k >>= _SHIFT
    np.subtract(N_UNIT_KEYS - 1, k, out=k, where=x32 > 0.5)
    return k
