"""One small least-recently-used cache bounded by bytes, for what is costly to build and cheap to keep.

The N-worker decoders keep per straggler pattern what they derive from it (the
spline's decoding matrix, the locators' misfit forms, the noise-aware spline's
hat matrices), and a latency law of ``"dist": "file"`` keeps its file's values:
each in a :class:`ByteLRU` of a stated size. An entry counts the bytes of the
arrays it holds (:func:`nbytes`); when a new one would pass ``max_bytes``, the
entries used least recently go first, and an entry larger than the whole cache
is handed back without being kept (so ``max_bytes = 0`` keeps nothing).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


def nbytes(value: Any) -> int:
    """The bytes of the arrays in ``value``: a torch tensor, a numpy array, or a tuple / list of them."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "element_size"):  # a torch tensor
        return value.numel() * value.element_size()
    return int(getattr(value, "nbytes", 0))


class ByteLRU:
    """``get(key, build)``: the entry of ``key``, built by ``build()`` on a miss and kept while the entries
    together hold at most ``max_bytes`` (least recently used evicted first)."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"a cache's size must be a whole number of bytes >= 0; got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.used = 0  # bytes the kept entries hold
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # least recently used first

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found[0]
        value = build()
        size = nbytes(value)
        if size <= self.max_bytes:
            while self.used + size > self.max_bytes:
                self.used -= self._entries.popitem(last=False)[1][1]
            self._entries[key] = (value, size)
            self.used += size
        return value

    def keys(self) -> list:
        """The kept keys, least recently used first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0
