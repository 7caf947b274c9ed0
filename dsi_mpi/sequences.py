"""Token sequences: the one helper the policy and the backends share (pure)."""

from __future__ import annotations

from collections.abc import Sequence

_PREFIX_CHUNK = 256


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    Compares slices at C speed and walks element by element only inside the slice that
    differs: the coordinator calls this for every task it sends, on contexts as long as the
    prompt plus the output, so a per-element Python loop would cost tens of microseconds."""
    n = min(len(a), len(b))
    a, b = tuple(a[:n]), tuple(b[:n])  # no copy for a tuple that is the prefix already
    if a == b:  # the usual case: a server's cache is a prefix of its next context
        return n
    i = 0
    while tuple(a[i:i + _PREFIX_CHUNK]) == tuple(b[i:i + _PREFIX_CHUNK]):
        i += _PREFIX_CHUNK
    while a[i] == b[i]:
        i += 1
    return i
