"""Name -> algorithm class lookup, so artifacts and the CLI can refer to algorithms by name."""

from __future__ import annotations

import importlib

from models.base import Recommender
from models.errors import InvalidInputError

# name -> "module:Class"; imported lazily so that importing models stays cheap.
_ALGORITHMS: dict[str, str] = {
    "als": "models.factorization:ALS",
    "bpr": "models.factorization:BPR",
    "lmf": "models.factorization:LMF",
    "itemknn": "models.neighbors:ItemKNN",
    "bm25": "models.neighbors:BM25ItemKNN",
    "ease": "models.ease:EASE",
    "popularity": "models.popularity:Popularity",
    "trending": "models.popularity:Trending",
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
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, Recommender)
    return cls
