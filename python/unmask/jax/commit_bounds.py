"""Float32 bounds that decide commit's threshold and factor rules exactly as the float64
arithmetic of the torch kernels and the reference does (docs/design.md, commit).

JAX computes in float32 (float64 is off by default). There, `conf > threshold` rounds the
threshold to the nearest float32 (0.8 rounds up: a confidence of exactly float32(0.8)
passes in float64 and fails here), and `(n + 1) * (1 - conf) < factor` rounds twice.
Each rule becomes instead `conf > bound`, with a float32 bound worked out on the host in
Python floats (doubles, the C++ and CUDA kernels' arithmetic): the largest float32
confidence the rule refuses in double arithmetic. Both rules are monotone in conf, so
every float32 above the bound passes and none at or below it does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

def _key(value: np.float32) -> int:
    """float32 values as unsigned ints in the same order (the sign bit flipped for
    positives, every bit for negatives): a binary search over them is over the floats."""
    bits = int(np.float32(value).view(np.uint32))
    return bits | 0x80000000 if bits < 0x80000000 else 0xFFFFFFFF - bits


def _value(key: int) -> np.float32:
    bits = key & 0x7FFFFFFF if key >= 0x80000000 else 0xFFFFFFFF - key
    return np.uint32(bits).view(np.float32)


def _largest_refused(passes: Callable[[float], bool]) -> np.float32:
    """The largest float32 c with passes(c) false, for a rule false at -inf, true at +inf
    and monotone between: a binary search over the float32 values (32 halvings; a walk
    step by step could cross billions of them, near 0 where 1 - c rounds to 1)."""
    refused, passed = _key(np.float32(-np.inf)), _key(np.float32(np.inf))
    while passed - refused > 1:
        middle = (refused + passed) // 2
        if passes(float(_value(middle))):
            passed = middle
        else:
            refused = middle
    return _value(refused)


def threshold_bound(threshold: float) -> float:
    """conf > threshold_bound(t) in float32 exactly where float64(conf) > t."""
    return float(_largest_refused(lambda c: c > threshold))


@functools.lru_cache(maxsize=64)
def factor_bounds(factor: float, length: int) -> np.ndarray:
    """bounds[r] (float32 [length]): the eligible position of rank r (the (r + 1)-th most
    confident) passes the factor rule, (r + 2) * (1 - conf) < factor in double arithmetic,
    exactly where conf > bounds[r]. Cached: a sampler commits with one factor and block."""
    return np.asarray([_largest_refused(lambda c, n=r + 2: n * (1.0 - c) < factor) for r in range(length)],
                      np.float32)
