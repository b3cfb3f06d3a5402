"""Map external string ids (users, items) to contiguous indices and back.

External ids never leak past the model boundary: algorithms see indices only, and a vocabulary
turns unknown ids into a typed error or a "missing" marker instead of an ``IndexError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat

import numpy as np

from .errors import InvalidInputError, NotFoundError

MISSING = -1
"""Index returned by :meth:`Vocabulary.lookup` for ids the vocabulary does not hold."""


class Vocabulary:
    """An immutable, ordered set of string ids with O(1) lookup in both directions."""

    __slots__ = ("_ids", "_index", "_strings", "kind")

    def __init__(self, ids: Iterable[str] | np.ndarray, *, kind: str = "item") -> None:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).astype(str)
        if arr.ndim != 1:
            raise InvalidInputError(f"{kind} ids must be one-dimensional")
        self.kind = kind
        self._ids = arr
        # The list shares its str objects with the dict's keys: decoding a result list is then
        # k list reads instead of converting fixed-width numpy unicode back to Python strings.
        self._strings: list[str] = arr.tolist()
        self._index: dict[str, int] = {s: i for i, s in enumerate(self._strings)}
        if len(self._index) != len(arr):
            raise InvalidInputError(f"{kind} ids must be unique")

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, external_id: object) -> bool:
        return external_id in self._index

    @property
    def ids(self) -> np.ndarray:
        """The external ids as a unicode numpy array, in index order."""
        return self._ids

    def index(self, external_id: str) -> int:
        """Index of one id; raises :class:`NotFoundError` if unknown."""
        try:
            return self._index[external_id]
        except KeyError:
            raise NotFoundError(f"unknown {self.kind} id {external_id!r}") from None

    def get(self, external_id: str) -> int:
        """Index of one id, or :data:`MISSING` if unknown (one dict lookup, no array)."""
        return self._index.get(external_id, MISSING)

    def lookup(self, external_ids: Sequence[str]) -> np.ndarray:
        """Indices of many ids, with :data:`MISSING` for the unknown ones."""
        # map() with a repeated default runs the dict lookups in C, not in a generator frame.
        found = map(self._index.get, external_ids, repeat(MISSING))
        return np.fromiter(found, dtype=np.int64, count=len(external_ids))

    def id(self, index: int) -> str:
        """External id at ``index``."""
        return str(self._ids[index])

    def decode(self, indices: np.ndarray) -> list[str]:
        """External ids for an array of indices."""
        strings = self._strings
        return [strings[i] for i in np.asarray(indices, dtype=np.int64).tolist()]

    def to_array(self) -> np.ndarray:
        """Array form for an ``.npz`` file (fixed-width unicode, loadable without pickle)."""
        return self._ids

    @classmethod
    def from_array(cls, arr: np.ndarray, *, kind: str = "item") -> Vocabulary:
        return cls(arr, kind=kind)
