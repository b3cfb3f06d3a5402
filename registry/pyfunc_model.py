"""The MLflow pyfunc flavour of an Affinity model (models-from-code: no pickled Python object).

MLflow loads this file as code. The model's state is two artifacts: the Affinity artifact
directory (``affinity``), read with the same checksum-verified, pickle-free loader the service
uses, and the source of the ``models`` package it was trained with (``affinity_models_code``).
That source is imported under a private package name, never as ``models``: an environment that
loads the pyfunc (MLflow's, an application's) may have another project's ``models`` package, and
the model neither replaces nor meets it, nor needs Affinity installed. Every list comes from the
same ranking pipeline as a served one.

Input: a DataFrame with a ``user_id`` column and, optionally, ``recent_item_ids`` (items the user
acted on since training, folded in) and ``exclude_item_ids`` (items never to return), each a list
of item ids per row. Parameters: ``k`` (default 10), ``item_types`` and ``categories`` (lists;
empty means no restriction) and ``include_seen`` (default false), as in the ``Recommend`` RPC.
Output: one row per recommendation with ``user_id``, ``rank``, ``item_id``, ``score`` and
``source``.

Ranking rules (``models/rules.py``), the parameters named as ``affinity batch-recommend``'s
flags, applied to every row as ``Recommend`` and ``batch-recommend`` apply them (all off by
default): ``diversity_cap`` (at most N items per category, 0: off), ``mmr`` (0 to 1),
``boosts`` (a list of ``"[category:|type:]NAME[,...]=FACTOR"``), ``promote``
(``"[category:|type:]NAME[,...]=SHARE"``, empty: none), ``explore`` (share of the places for new
items, 0: off), ``explore_max_age_days`` (default 90), ``explore_seed`` (default 0) and
``explore_max_interactions`` (-1: no limit). The exploration's clock is read once per call.
"""

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = ["user_id", "rank", "item_id", "score", "source"]


def private_package(source: str) -> ModuleType:
    """The package in the folder ``source``, imported under a name of its own.

    The name is derived from the folder, so two models loaded into one process each keep their
    own code, and loading the same model twice reuses the first import.
    """
    folder = Path(source).resolve()
    name = "_affinity_models_" + hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no Python package in {folder}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[name]
        raise
    return package


DEFAULT_EXPLORE_MAX_AGE_DAYS = 90.0


def _filter_spec(ranking: ModuleType, text: str, field: str) -> tuple[Any, float]:
    """``"[category:|type:]NAME[,...]=NUMBER"`` as (ItemFilter, number): the syntax of
    ``batch-recommend``'s ``--boost`` and ``--promote`` (``training.batch.parse_filter_spec``;
    this file may import nothing of Affinity but the model's own code)."""
    spec, sep, raw = str(text).rpartition("=")
    if not sep or not spec.strip():
        raise ValueError(f"{field}: expected [category:|type:]NAME=NUMBER, got {text!r}")
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"{field}: {raw!r} is not a number") from None
    types: list[str] = []
    categories: list[str] = []
    for part in spec.split(","):
        kind, colon, name = part.strip().partition(":")
        if not colon:
            kind, name = "category", kind
        name = name.strip()
        if kind.strip() not in {"category", "type"} or not name:
            raise ValueError(f"{field}: expected category:NAME or type:NAME, got {part.strip()!r}")
        (categories if kind.strip() == "category" else types).append(name)
    return ranking.ItemFilter.of(types, categories), number


def rules_from_params(ranking: ModuleType, rules: ModuleType, params: dict[str, Any]) -> Any:
    """The ``Rules`` (of the model's own ``rules`` module) the parameters ask for, or None."""
    cap = int(params.get("diversity_cap") or 0)
    mmr = float(params.get("mmr") or 0.0)
    diversity = rules.Diversity(max_per_category=cap, mmr=mmr) if cap or mmr else None
    boosts = []
    for text in params.get("boosts") or []:
        if str(text).strip():
            flt, factor = _filter_spec(ranking, text, "boosts")
            boosts.append(rules.Boost(flt, factor))
    promotion = None
    if str(params.get("promote") or "").strip():
        flt, share = _filter_spec(ranking, params["promote"], "promote")
        promotion = rules.Promotion(flt, share)
    exploration = None
    explore = float(params.get("explore") or 0.0)
    if explore:
        limit = params.get("explore_max_interactions")
        age = params.get("explore_max_age_days")
        exploration = rules.Exploration(
            share=explore,
            max_age_days=float(DEFAULT_EXPLORE_MAX_AGE_DAYS if age is None else age),
            seed=int(params.get("explore_seed") or 0),
            max_interactions=None if limit is None or int(limit) < 0 else int(limit),
        )
    made = rules.Rules(
        diversity=diversity, boosts=tuple(boosts), promotion=promotion, exploration=exploration
    )
    return None if made.empty else made.settled()


def _ids(value: Any) -> list[str]:
    """A list-of-ids cell (a list, an array, or missing) as a list of strings."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return [str(x) for x in value]


class AffinityPyfuncModel(PythonModel):
    """Serves the ranking pipeline's lists through MLflow's pyfunc API."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        package = private_package(context.artifacts["affinity_models_code"]).__name__
        artifact = importlib.import_module(f"{package}.artifact")
        self.ranking = importlib.import_module(f"{package}.ranking")
        self.rules = importlib.import_module(f"{package}.rules")
        bundle = artifact.load_artifact(context.artifacts["affinity"])
        self.pipeline = self.ranking.RankingPipeline.from_bundle(bundle)

    # A DataFrame hint tells MLflow not to derive a schema: the logged signature is explicit.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        params = params or {}
        k = int(params.get("k", 10))
        item_filter = self.ranking.ItemFilter.of(
            [t for t in params.get("item_types") or [] if t],
            [c for c in params.get("categories") or [] if c],
        )
        include_seen = bool(params.get("include_seen", False))
        rules = rules_from_params(self.ranking, self.rules, params)
        frame = pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise ValueError("input must have a 'user_id' column")
        recent = frame["recent_item_ids"] if "recent_item_ids" in frame.columns else None
        exclude = frame["exclude_item_ids"] if "exclude_item_ids" in frame.columns else None
        rows: list[tuple[str, int, str, float, str]] = []
        for pos, user in enumerate(frame["user_id"].astype(str)):
            result = self.pipeline.recommend(
                user,
                k,
                recent_item_ids=_ids(recent.iloc[pos]) if recent is not None else [],
                exclude_item_ids=_ids(exclude.iloc[pos]) if exclude is not None else [],
                item_filter=item_filter,
                include_seen=include_seen,
                rules=rules,
            )
            for rank, (item, score) in enumerate(
                zip(result.item_ids, result.scores, strict=True), start=1
            ):
                rows.append((user, rank, item, float(score), str(result.source)))
        return pd.DataFrame(rows, columns=COLUMNS)


mlflow.models.set_model(AffinityPyfuncModel())
