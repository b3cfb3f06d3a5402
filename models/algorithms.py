"""Name -> algorithm class lookup, so artifacts and the CLI can refer to algorithms by name."""

from __future__ import annotations

import importlib

from .base import Recommender
from .errors import InvalidInputError

# name -> "module:Class" (relative to this package); imported lazily so that importing the
# package stays cheap.
_ALGORITHMS: dict[str, str] = {
    "als": ".factorization:ALS",
    "bpr": ".factorization:BPR",
    "lmf": ".factorization:LMF",
    "itemknn": ".neighbors:ItemKNN",
    "bm25": ".neighbors:BM25ItemKNN",
    "ease": ".ease:EASE",
    "gfcf": ".gfcf:GFCF",
    "popularity": ".popularity:Popularity",
    "trending": ".popularity:Trending",
}


def algorithm_names() -> list[str]:
    """Every algorithm name the CLI and artifacts accept."""
    return list(_ALGORITHMS)


def get_algorithm(name: str) -> type[Recommender]:
    """The class implementing ``name``; raises :class:`InvalidInputError` for unknown names."""
    try:
        target = _ALGORITHMS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown algorithm {name!r}; choose one of {', '.join(_ALGORITHMS)}", field="algorithm"
        ) from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name, __package__), class_name)
    assert issubclass(cls, Recommender)
    return cls
