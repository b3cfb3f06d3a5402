"""Every list Affinity makes comes from one ranking pipeline.

A model is trained with ``affinity train`` into a real MLflow store; then, for the same users,
item filter and excluded items, the lists of a live gRPC server following ``@champion``,
``affinity batch-recommend``, the registered MLflow pyfunc and the batch ranking that offline
evaluation and the promotion gate use must hold identical ids in identical order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from affinity.cli import main
from models.ranking import ItemFilter, RankingPipeline
from models.rules import Boost, Diversity, Exploration, Promotion, Rules
from registry.mlflow_store import load_model_uri
from service.loader import ModelHolder, ModelLoader
from tests.service.conftest import client_for, running, settings_for
from training.generate import generate

K = 8
URI = "models:/affinity@champion"


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, _empty_tracking_db: Path
) -> Iterator[tuple[Path, str]]:
    """A working folder with generated logs and a tracking store holding one trained champion."""
    work = tmp_path_factory.mktemp("one-path")
    generate(work / "logs", users=400, items=160, interactions=16_000, seed=5)
    shutil.copyfile(_empty_tracking_db, work / "mlflow.db")
    uri = f"sqlite:///{work}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(work)
        args = ["train", "--interactions", str(work / "logs" / "interactions.parquet")]
        args += ["--items", str(work / "logs" / "items.parquet"), "--algorithm", "als"]
        args += ["--param", "factors=8"]
        assert main([*args, "--json", "--quiet"]) == 0
        yield work, uri
    mlflow.set_tracking_uri(previous)


def _cases(
    bundle_items: list[str], item_types: list[str]
) -> list[tuple[str, list[str], list[str]]]:
    """(name, item types, excluded ids): no filter, and a type filter with exclusions."""
    return [
        ("plain", [], []),
        ("filtered", [item_types[0]], bundle_items[:6]),
    ]


def test_server_batch_pyfunc_and_evaluation_rank_identically(
    trained: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(work)
    bundle = load_model_uri(URI)
    users = [bundle.users.id(u) for u in range(0, len(bundle.users), 37)]
    # Excluding the most popular items takes out items these users would otherwise get.
    popular = [bundle.items.id(int(i)) for i in np.argsort(-bundle.popularity, kind="stable")]
    types = sorted({str(t) for t in bundle.catalog.item_type if t})
    assert types, "the generated catalog has item types"
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(users) + "\n")

    settings = settings_for(URI, tmp_path, tracking_uri=uri)
    holder = ModelHolder()
    assert ModelLoader(settings, holder).load_initial()
    pyfunc = mlflow.pyfunc.load_model(URI)
    evaluation = RankingPipeline.from_bundle(bundle)
    user_index = np.array([bundle.users.get(u) for u in users])

    with running(settings, holder) as port, client_for(port) as client:
        for name, item_types, excluded in _cases(popular, types):
            served = {
                u: [
                    item.item_id
                    for item in client.recommend(
                        u, k=K, item_types=item_types, exclude_item_ids=excluded
                    ).items
                ]
                for u in users
            }

            out = tmp_path / f"{name}.csv"
            args = ["batch-recommend", "--model", URI, "--users", str(users_file)]
            args += ["--k", str(K), "--out", str(out), "--quiet"]
            args += [f"--item-type={t}" for t in item_types]
            args += [f"--exclude-item={i}" for i in excluded]
            assert main(args) == 0, capsys.readouterr().err
            batch_frame = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
            batch = {u: batch_frame[batch_frame.user_id == u]["item_id"].tolist() for u in users}

            frame = pd.DataFrame({"user_id": users, "exclude_item_ids": [excluded] * len(users)})
            result = pyfunc.predict(frame, params={"k": K, "item_types": item_types})
            from_pyfunc = {u: result[result.user_id == u]["item_id"].tolist() for u in users}

            exclude_rows = sp.csr_matrix(
                (
                    np.ones(len(users) * len(excluded), dtype=np.float32),
                    (
                        np.repeat(np.arange(len(users)), len(excluded)),
                        np.tile(bundle.items.lookup(excluded), len(users)),
                    ),
                ),
                shape=(len(users), len(bundle.items)),
            )
            ids = evaluation.rank_users(
                user_index, K, exclude=exclude_rows, item_filter=ItemFilter.of(item_types)
            )
            evaluated = {
                u: bundle.items.decode(row[row >= 0]) for u, row in zip(users, ids, strict=True)
            }

            for user in users:
                assert len(served[user]) == K, (name, user)
                assert served[user] == batch[user] == from_pyfunc[user] == evaluated[user], (
                    name,
                    user,
                )
            if excluded:
                assert not {i for items in served.values() for i in items} & set(excluded)
                allowed = {
                    bundle.items.id(i)
                    for i in np.flatnonzero(bundle.catalog.item_type == item_types[0])
                }
                assert {i for items in served.values() for i in items} <= allowed


PROBE = """
import json, sys
import models
assert models.UNRELATED == "yes", "the unrelated models package is shadowed"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"user_id": sys.argv[2:]}), params={"k": %d})
import models
assert models.UNRELATED == "yes", "loading the pyfunc replaced the unrelated models package"
assert not any(name.startswith("models.") for name in sys.modules), sorted(sys.modules)
print(json.dumps({u: out[out.user_id == u]["item_id"].tolist() for u in sys.argv[2:]}))
"""


def test_the_pyfunc_loads_beside_an_unrelated_models_package(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    """The registered pyfunc carries its own copy of the model code under a private name: in a
    process that already imported another project's top-level ``models``, it loads, ranks as
    the service does, and leaves that package alone."""
    _, uri = trained
    other = tmp_path / "other-project" / "models"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('UNRELATED = "yes"\n')
    (other / "artifact.py").write_text('raise ImportError("the wrong models package")\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(other.parent)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        bundle = load_model_uri(URI)
    users = [bundle.users.id(u) for u in range(0, len(bundle.users), 50)]
    done = subprocess.run(
        [sys.executable, "-c", PROBE % K, URI, *users],
        cwd=tmp_path,  # not the repository, whose own models/ would be found first
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lists = json.loads(done.stdout.strip().splitlines()[-1])
    pipeline = RankingPipeline.from_bundle(bundle)
    assert lists == {u: pipeline.recommend(u, K).item_ids for u in users}


# ------------------------------------------------------------------------- ranking rules
def _rule_cases(
    categories: list[str], excluded: list[str], now: float
) -> list[tuple[str, list[str], dict[str, Any], Rules, list[str], dict[str, Any]]]:
    """(name, batch-recommend flags, pyfunc params, the Rules they stand for, excluded ids, the
    request's RankingRules as a dict)."""
    boosted, promoted = categories[0], categories[1]
    return [
        (
            "diversity",
            ["--diversity-cap", "2", "--mmr", "0.3"],
            {"diversity_cap": 2, "mmr": 0.3},
            Rules(diversity=Diversity(max_per_category=2, mmr=0.3)),
            [],
            {"diversity": {"max_per_category": 2, "mmr": 0.3}},
        ),
        (
            "campaign",
            [
                f"--boost=category:{boosted}=1.5",
                f"--promote={promoted}=0.2",
                "--explore=0.1",
                "--explore-max-age-days=100000",  # the generated log is in the past
                "--explore-seed=3",
                "--diversity-cap=4",
            ],
            {
                "boosts": [f"category:{boosted}=1.5"],
                "promote": f"{promoted}=0.2",
                "explore": 0.1,
                "explore_max_age_days": 100000.0,
                "explore_seed": 3,
                "diversity_cap": 4,
            },
            Rules(
                diversity=Diversity(max_per_category=4),
                boosts=(Boost(ItemFilter.of(categories=[boosted]), 1.5),),
                promotion=Promotion(ItemFilter.of(categories=[promoted]), 0.2),
                exploration=Exploration(share=0.1, max_age_days=100000, seed=3, now=now),
            ),
            excluded,
            {
                "diversity": {"max_per_category": 4},
                "boosts": [{"categories": [boosted], "factor": 1.5}],
                "promotion": {"categories": [promoted], "share": 0.2},
                "exploration": {"share": 0.1, "max_age_days": 100000, "seed": 3},
            },
        ),
    ]


def test_batch_pyfunc_and_evaluation_apply_ranking_rules_identically(
    trained: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rules given as a gRPC request's RankingRules, as batch-recommend flags, as pyfunc
    parameters and as a Rules value to the batch ranking of offline evaluation make identical
    lists."""
    work, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(work)
    bundle = load_model_uri(URI)
    users = [bundle.users.id(u) for u in range(0, len(bundle.users), 37)]
    popular = [bundle.items.id(int(i)) for i in np.argsort(-bundle.popularity, kind="stable")]
    categories = sorted({str(c) for c in bundle.catalog.category if c})
    assert len(categories) >= 2, "the generated catalog has categories"
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(users) + "\n")
    pyfunc = mlflow.pyfunc.load_model(URI)
    evaluation = RankingPipeline.from_bundle(bundle)
    user_index = np.array([bundle.users.get(u) for u in users])

    settings = settings_for(URI, tmp_path, tracking_uri=uri)
    holder = ModelHolder()
    assert ModelLoader(settings, holder).load_initial()
    with running(settings, holder) as port, client_for(port) as client:
        for _ in range(2):  # an exploration draws per UTC day: retry across midnight
            if _rules_agree(
                client,
                users,
                users_file,
                tmp_path,
                capsys,
                pyfunc,
                evaluation,
                bundle,
                user_index,
                categories,
                popular,
            ):
                return
    pytest.fail("the paths disagreed on two days in a row")


def _rules_agree(
    client: Any,
    users: list[str],
    users_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pyfunc: Any,
    evaluation: RankingPipeline,
    bundle: Any,
    user_index: np.ndarray,
    categories: list[str],
    popular: list[str],
) -> bool:
    """Whether the lists were compared within one UTC day (the exploration draws per day; a
    comparison that crossed midnight returns ``False`` and is tried again); every path must make
    the same lists for every rule case."""
    now = time.time()
    lists: dict[str, tuple[dict[str, list[str]], ...]] = {}
    for name, flags, params, rules, excluded, request_rules in _rule_cases(
        categories, popular[:6], now
    ):
        served = {
            u: client.recommend(u, k=K, exclude_item_ids=excluded, rules=request_rules).item_ids
            for u in users
        }
        out = tmp_path / f"rules-{name}.csv"
        args = ["batch-recommend", "--model", URI, "--users", str(users_file)]
        args += ["--k", str(K), "--out", str(out), "--quiet", *flags]
        args += [f"--exclude-item={i}" for i in excluded]
        assert main(args) == 0, capsys.readouterr().err
        frame = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
        batch = {u: frame[frame.user_id == u]["item_id"].tolist() for u in users}

        query = pd.DataFrame({"user_id": users, "exclude_item_ids": [excluded] * len(users)})
        result = pyfunc.predict(query, params={"k": K, **params})
        from_pyfunc = {u: result[result.user_id == u]["item_id"].tolist() for u in users}

        exclude_rows = sp.csr_matrix(
            (
                np.ones(len(users) * len(excluded), dtype=np.float32),
                (
                    np.repeat(np.arange(len(users)), len(excluded)),
                    np.tile(bundle.items.lookup(excluded), len(users)),
                ),
            ),
            shape=(len(users), len(bundle.items)),
        )
        ids = evaluation.rank_users(user_index, K, exclude=exclude_rows, rules=rules)
        evaluated = {
            u: bundle.items.decode(row[row >= 0]) for u, row in zip(users, ids, strict=True)
        }
        lists[name] = (served, batch, from_pyfunc, evaluated)
    if int(now // 86_400) != int(time.time() // 86_400):
        return False
    plain = {u: evaluation.recommend(u, K).item_ids for u in users}
    for name, (served, batch, from_pyfunc, evaluated) in lists.items():
        for user in users:
            assert served[user] == batch[user] == from_pyfunc[user] == evaluated[user], (
                name,
                user,
            )
        assert any(batch[u] != plain[u] for u in users), f"{name}: the rules changed nothing"
    # The rules did what they say: at most 2 per category, the promoted category in every list.
    category_of = dict(zip(bundle.items.ids, bundle.catalog.category, strict=True))
    for items in lists["diversity"][0].values():
        assert max(Counter(category_of[i] for i in items).values()) <= 2
    promoted = categories[1]
    for items in lists["campaign"][0].values():
        assert promoted in {category_of[i] for i in items}
        assert not set(items) & set(popular[:6])
    return True
