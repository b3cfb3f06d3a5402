"""The experiment report: per-user aggregation in the database (both databases; PostgreSQL when
``AFFINITY_TEST_POSTGRES_URI`` is set), the user-level statistics, the decision rule, the MLflow
run, the promotion in a real registry and the ``affinity experiment report`` command."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pytest

from models.errors import InvalidInputError
from service.events import Event, EventStore, Response
from service.experiment_report import (
    ArmData,
    Decision,
    ExperimentReport,
    add_report_arguments,
    decide,
    difference_estimate,
    experiment_report,
    lift_estimate,
    log_report,
    mean_estimate,
    promote,
    ratio_estimate,
    summarize,
    user_aggregates,
)
from service.experiments import ExperimentBook, ExperimentConfig, ExperimentError, parse_config

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SINCE, UNTIL = T0 - timedelta(hours=1), T0 + timedelta(days=1)


@pytest.fixture
def store(events_db: str) -> Iterator[EventStore]:
    with EventStore.open(events_db) as opened:
        yield opened


def _config(**overrides: object) -> ExperimentConfig:
    data: dict[str, object] = {
        "name": "exp",
        "arms": [
            {"name": "control", "model": "champion", "share": 0.5},
            {"name": "challenger", "model": "challenger", "share": 0.5},
            {"name": "ghost", "model": "3", "shadow": True},
        ],
        "min_users": 2,
    }
    data.update(overrides)
    return parse_config(data)


def _answer(
    rec: str,
    user: str,
    arm: str | None,
    at: datetime = T0,
    *,
    method: str = "Recommend",
    experiment: str | None = "exp",
    version: str = "1",
) -> Response:
    return Response(
        rec,
        method,
        user,
        ("i1", "i2", "i3"),
        "personalized",
        "affinity",
        version,
        at,
        experiment=experiment if arm is not None else None,
        arm=arm,
    )


def _ev(
    n: int, rec: str | None, name: str, minutes: float, user: str, price: float | None = None
) -> Event:
    return Event(
        event_id=f"e{n}",
        user_id=user,
        item_id="i1",
        event=name,
        timestamp=T0 + timedelta(minutes=minutes),
        recommendation_id=rec,
        price=price,
    )


def _fill(store: EventStore) -> None:
    """Control: u1 (2 answers: 2 clicks and a purchase of 10 on r1, a click 2 days after r2),
    u2 (1 answer, only an impression), u3 (1 answer, a view). Challenger: u4 (3 answers: a
    click, a click and a purchase of 5.5, a purchase without a price), u5 (1 answer, nothing).
    Beside them: a shadow list with a click, an answer before the period, one outside any
    experiment, one of another experiment."""
    ExperimentBook(store).start(_config())
    store.record_responses(
        [
            _answer("r1", "u1", "control"),
            _answer("r2", "u1", "control", T0 + timedelta(minutes=10)),
            _answer("r3", "u2", "control"),
            _answer("r4", "u3", "control"),
            _answer("r5", "u4", "challenger", version="2"),
            _answer("r6", "u4", "challenger", version="2"),
            _answer("r7", "u4", "challenger", version="2"),
            _answer("r8", "u5", "challenger", version="2"),
            _answer("r9", "u1", "ghost", method="shadow", version="3"),
            _answer("r10", "u6", "control", T0 - timedelta(days=2)),
            _answer("r11", "u7", None),
            _answer("r12", "u8", "control", experiment="other"),
        ]
    )
    outcomes = store.append(
        [
            _ev(1, "r1", "click", 1, "u1"),
            _ev(2, "r1", "click", 2, "u1"),
            _ev(3, "r1", "purchase", 3, "u1", price=10.0),
            _ev(4, "r2", "click", 60 * 48, "u1"),  # two days after r2: outside the window
            _ev(5, "r3", "impression", 0, "u2"),
            _ev(6, "r4", "view", 5, "u3"),
            _ev(7, "r5", "click", 1, "u4"),
            _ev(8, "r6", "click", 1, "u4"),
            _ev(9, "r6", "purchase", 2, "u4", price=5.5),
            _ev(10, "r7", "purchase", 2, "u4"),
            _ev(11, "r9", "click", 1, "u1"),  # names the shadow list: never shown, not credited
            _ev(12, "r10", "click", 1, "u6"),
            _ev(13, "r11", "click", 1, "u7"),
            _ev(14, "r12", "click", 1, "u8"),
            _ev(15, None, "purchase", 1, "u5", price=99.0),
        ],
        now=T0 + timedelta(days=3),
    )
    assert all(o.status.value == "accepted" for o in outcomes)


# --- the database -----------------------------------------------------------------------------


def test_user_aggregates_credit_each_users_events_within_the_window(store: EventStore) -> None:
    _fill(store)
    data = user_aggregates(store, "exp", since=SINCE, until=UNTIL)
    assert set(data) == {"control", "challenger"}  # the shadow arm shows nothing
    control, challenger = data["control"], data["challenger"]
    # users in id order: u1, u2, u3 / u4, u5
    assert control.answers.tolist() == [2, 1, 1]
    assert control.clicked.tolist() == [1, 0, 1]
    assert control.clicks.tolist() == [2, 0, 1]  # the late click on r2 is not credited
    assert control.converted.tolist() == [1, 0, 0]
    assert control.revenue.tolist() == pytest.approx([10.0, 0.0, 0.0])
    assert challenger.answers.tolist() == [3, 1]
    assert challenger.clicked.tolist() == [2, 0]
    assert challenger.clicks.tolist() == [2, 0]
    assert challenger.converted.tolist() == [1, 0]
    assert challenger.revenue.tolist() == pytest.approx([5.5, 0.0])
    # A 72-hour window credits r2's late click too.
    wide = user_aggregates(store, "exp", since=SINCE, until=UNTIL, window=timedelta(hours=72))
    assert wide["control"].clicked.tolist() == [2, 0, 1]
    assert wide["control"].clicks.tolist() == [3, 0, 1]


def test_report_numbers_by_hand(store: EventStore) -> None:
    _fill(store)
    report = experiment_report(store, "exp", since=SINCE, until=UNTIL)
    control, challenger = report.arm("control"), report.arm("challenger")
    assert (control.users, control.answers, control.clicked, control.clicks) == (3, 4, 2, 3)
    assert (control.converters, control.revenue) == (1, pytest.approx(10.0))
    assert control.ctr.value == pytest.approx(0.5)
    # Delta method by hand: y = (1, 0, 1), x = (2, 1, 1): Var(y) = Var(x) = 1/3, Cov = 1/6,
    # Var(R) = (1/3 - 2 * 0.5 / 6 + 0.25 / 3) / (3 * (4/3)^2) = 3/64.
    assert control.ctr.se == pytest.approx(math.sqrt(3) / 8)
    assert control.ctr.low == pytest.approx(0.5 - 1.959964 * math.sqrt(3) / 8, rel=1e-6)
    assert control.conversion.value == pytest.approx(1 / 3)
    assert control.conversion.se == pytest.approx(math.sqrt(1 / 3 / 3))  # s^2 = 1/3, n = 3
    assert control.revenue_per_user.value == pytest.approx(10 / 3)
    assert control.revenue_per_user.se == pytest.approx(math.sqrt(100 / 3 / 3))
    assert (challenger.users, challenger.answers, challenger.clicked) == (2, 4, 2)
    assert challenger.ctr.value == pytest.approx(0.5)
    assert challenger.conversion.value == pytest.approx(0.5)
    assert challenger.revenue_per_user.value == pytest.approx(2.75)
    revenue = report.comparison("challenger", "revenue")
    assert revenue.difference.value == pytest.approx(2.75 - 10 / 3)
    assert revenue.difference.se == pytest.approx(
        math.hypot(challenger.revenue_per_user.se, control.revenue_per_user.se)
    )
    assert revenue.lift.value == pytest.approx(2.75 / (10 / 3) - 1)
    assert control.versions == [("affinity", "1", 4)]
    assert challenger.versions == [("affinity", "2", 4)]
    assert report.shadow_answers == {"ghost": 1}
    assert report.users_in_several_arms == 0
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["arms"][0]["ctr"]["value"] == pytest.approx(0.5)
    assert [arm["name"] for arm in as_json["arms"]] == ["control", "challenger"]
    decision = decide(report, metric="conversion")
    assert not decision.promote and "includes zero" in decision.reason


def test_users_moved_between_arms_are_counted(store: EventStore) -> None:
    ExperimentBook(store).start(_config())
    store.record_responses(
        [_answer("a", "u1", "control"), _answer("b", "u1", "challenger", version="2")]
    )
    report = experiment_report(store, "exp", since=SINCE, until=UNTIL)
    assert report.users_in_several_arms == 1
    assert [arm.users for arm in report.arms] == [1, 1]


def test_report_refuses_unknown_experiments_and_bad_periods(store: EventStore) -> None:
    from service.experiments import ExperimentNotFound

    with pytest.raises(ExperimentNotFound, match="nope"):
        experiment_report(store, "nope")
    ExperimentBook(store).start(_config())
    with pytest.raises(InvalidInputError, match="until"):
        experiment_report(store, "exp", since=T0, until=T0 - timedelta(seconds=1))
    with pytest.raises(InvalidInputError, match="window"):
        experiment_report(store, "exp", since=SINCE, until=UNTIL, window=timedelta(0))
    with pytest.raises(InvalidInputError, match="timezone"):
        experiment_report(store, "exp", since=datetime(2026, 1, 1), until=UNTIL)


# --- the statistics -----------------------------------------------------------------------------


def test_ratio_with_one_answer_per_user_is_a_mean() -> None:
    clicked = np.array([1, 0, 0, 1, 1, 0, 0, 0])
    ratio = ratio_estimate(clicked, np.ones(8))
    mean = mean_estimate(clicked)
    assert ratio.value == pytest.approx(mean.value) and ratio.se == pytest.approx(mean.se)
    assert math.isnan(ratio_estimate(np.zeros(0), np.zeros(0)).value)
    assert math.isnan(mean_estimate(np.array([1.0])).se)
    with pytest.raises(InvalidInputError, match="numerator"):
        ratio_estimate(np.ones(3), np.ones(4))


def test_difference_and_lift_of_independent_groups() -> None:
    a, b = mean_estimate(np.array([1.0, 2.0, 3.0, 4.0])), mean_estimate(np.array([1.0, 1.0, 3.0]))
    diff = difference_estimate(a, b)
    assert diff.value == pytest.approx(2.5 - 5 / 3)
    assert diff.se**2 == pytest.approx(a.se**2 + b.se**2)
    assert diff.high - diff.value == pytest.approx(1.959964 * diff.se, rel=1e-6)
    lift = lift_estimate(a, b)
    assert lift.value == pytest.approx(2.5 / (5 / 3) - 1)
    assert lift.se == pytest.approx(
        math.sqrt((a.se / b.value) ** 2 + (a.value * b.se) ** 2 / b.value**4)
    )
    assert math.isnan(lift_estimate(a, mean_estimate(np.zeros(3))).value)


def _clustered(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Users of two kinds: 80% light (1 + Poisson(1) answers, click rates around 5%), 20% heavy
    (1 + Poisson(15) answers, rates around 30%): one user's clicks go together."""
    heavy = rng.random(shape) < 0.2
    answers = 1 + rng.poisson(np.where(heavy, 15.0, 1.0))
    rate = rng.beta(np.where(heavy, 3.0, 1.0), np.where(heavy, 7.0, 19.0))
    return rng.binomial(answers, rate), answers


TRUE_CTR = (0.8 * 2 * 0.05 + 0.2 * 16 * 0.3) / (0.8 * 2 + 0.2 * 16)
"""E[clicked] / E[answers] of :func:`_clustered`'s users."""


def test_delta_method_interval_covers_the_true_ctr_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    runs, users = 2000, 300
    clicked, answers = _clustered(rng, (runs, users))
    covered = naive = 0
    for y, x in zip(clicked, answers, strict=True):
        estimate = ratio_estimate(y, x)
        covered += estimate.low <= TRUE_CTR <= estimate.high
        # Treating every answer as an independent trial ignores the clustering.
        p, n = y.sum() / x.sum(), x.sum()
        half = 1.959964 * math.sqrt(p * (1 - p) / n)
        naive += p - half <= TRUE_CTR <= p + half
    # 2000 runs: the binomial standard error of a 95% coverage is 0.5 points.
    assert 0.935 <= covered / runs <= 0.965
    assert naive / runs < 0.85


def test_delta_method_standard_error_agrees_with_the_bootstrap() -> None:
    rng = np.random.default_rng(3)
    clicked, answers = _clustered(rng, (2000,))
    estimate = ratio_estimate(clicked, answers)
    resample = rng.integers(0, 2000, size=(4000, 2000))
    boot = clicked[resample].sum(axis=1) / answers[resample].sum(axis=1)
    assert estimate.se == pytest.approx(float(boot.std(ddof=1)), rel=0.08)
    low, high = np.quantile(boot, [0.025, 0.975])
    assert estimate.low == pytest.approx(low, abs=0.2 * estimate.se)
    assert estimate.high == pytest.approx(high, abs=0.2 * estimate.se)


# --- the decision -----------------------------------------------------------------------------


def _report(control: ArmData, challenger: ArmData, **overrides: object) -> ExperimentReport:
    config = _config(**overrides)
    return summarize(
        config,
        {"control": control, "challenger": challenger},
        since=SINCE,
        until=UNTIL,
        versions={"control": [("affinity", "1", 1)], "challenger": [("affinity", "2", 1)]},
    )


def _users(rng: np.random.Generator, n: int, rate: float) -> ArmData:
    answers = 1 + rng.poisson(2.0, n)
    clicked = rng.binomial(answers, rate)
    converted = (rng.random(n) < rate / 3).astype(int)
    return ArmData.of(answers, clicked, clicked, converted, converted * 20.0)


def test_decide_promotes_a_clearly_better_challenger() -> None:
    rng = np.random.default_rng(1)
    report = _report(_users(rng, 3000, 0.10), _users(rng, 3000, 0.14), min_users=1000)
    decision = decide(report)
    assert decision.promote and decision.challenger == "challenger"
    assert decision.metric == "ctr" and decision.difference is not None
    assert decision.difference.low > 0 and "above zero" in decision.reason
    assert decision.challenger_versions == [("affinity", "2", 1)]
    assert decision.users == {"control": 3000, "challenger": 3000}


def test_decide_keeps_the_control_when_the_challenger_is_worse() -> None:
    rng = np.random.default_rng(2)
    report = _report(_users(rng, 3000, 0.14), _users(rng, 3000, 0.10), min_users=1000)
    decision = decide(report)
    assert not decision.promote and "below zero" in decision.reason
    assert decision.difference is not None and decision.difference.high < 0
    # Revenue goes the same way.
    assert not decide(report, metric="revenue").promote


def test_decide_never_promotes_on_too_few_users() -> None:
    rng = np.random.default_rng(1)
    report = _report(_users(rng, 3000, 0.10), _users(rng, 800, 0.30), min_users=1000)
    decision = decide(report)
    assert not decision.promote
    assert "too few users" in decision.reason and "'challenger' has 800" in decision.reason
    assert decide(report, min_users=500).promote
    with pytest.raises(InvalidInputError, match="min_users"):
        decide(report, min_users=0)
    with pytest.raises(InvalidInputError, match="metric"):
        decide(report, metric="ndcg")
    with pytest.raises(InvalidInputError, match="arm: 'control' is the control"):
        decide(report, arm="control")
    with pytest.raises(InvalidInputError, match="arm: 'ghost'"):
        decide(report, arm="ghost")  # a shadow arm shows nothing: there is nothing to compare


def test_decide_asks_which_of_several_challengers() -> None:
    arms = [
        {"name": "control", "model": "champion", "share": 0.4},
        {"name": "b", "model": "4", "share": 0.3},
        {"name": "c", "model": "5", "share": 0.3},
    ]
    rng = np.random.default_rng(4)
    data = {"control": _users(rng, 50, 0.1), "b": _users(rng, 50, 0.1), "c": _users(rng, 50, 0.3)}
    report = summarize(
        parse_config({"name": "three", "arms": arms, "min_users": 10}),
        data,
        since=SINCE,
        until=UNTIL,
    )
    undecided = decide(report)
    assert not undecided.promote and "name the one" in undecided.reason
    assert decide(report, arm="c").promote


# --- MLflow: the run and the promotion ------------------------------------------------------


def _registry(uri: str) -> mlflow.MlflowClient:
    """Versions 1 (champion), 2 (challenger) and 3 of ``affinity`` in a real registry."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("affinity")
    for n in (1, 2, 3):
        client.create_model_version("affinity", source=f"models-source/v{n}")
    client.set_registered_model_alias("affinity", "champion", "1")
    client.set_registered_model_alias("affinity", "challenger", "2")
    return client


@pytest.fixture
def registry_uri(tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # the report runs' artifacts land in tmp_path/mlruns
    return tracking


def _better() -> tuple[ExperimentReport, Decision]:
    rng = np.random.default_rng(1)
    report = _report(_users(rng, 3000, 0.10), _users(rng, 3000, 0.14), min_users=1000)
    return report, decide(report)


def test_log_report_writes_params_metrics_tags_plot_and_json(registry_uri: str) -> None:
    report, decision = _better()
    run_id = log_report(report, decision, registry_uri)
    run = mlflow.MlflowClient(tracking_uri=registry_uri).get_run(run_id)
    assert run.data.params["control"] == "control"
    assert run.data.params["challenger.model"] == "challenger"
    assert run.data.params["ghost.shadow"] == "true"
    metrics = run.data.metrics
    assert metrics["control.users"] == 3000
    assert metrics["challenger.ctr"] == pytest.approx(report.arm("challenger").ctr.value)
    assert (
        metrics["challenger.ctr_low"] < metrics["challenger.ctr"] < metrics["challenger.ctr_high"]
    )
    diff = report.comparison("challenger", "ctr").difference
    assert metrics["challenger.ctr_diff_low"] == pytest.approx(diff.low)
    assert "control.ctr_diff" not in metrics
    assert run.data.tags["decision.promote"] == "true"
    assert run.data.tags["decision.reason"] == decision.reason
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=registry_uri))
    png = (local / "experiment" / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    logged = json.loads((local / "experiment" / "report.json").read_text())
    assert logged["decision"]["promote"] is True
    assert logged["report"]["arms"][1]["users"] == 3000


def test_promote_moves_champion_to_the_version_the_arm_served(registry_uri: str) -> None:
    client = _registry(registry_uri)
    report, decision = _better()
    run_id = log_report(report, decision, registry_uri)
    promotion = promote(decision, tracking_uri=registry_uri, run_id=run_id)
    assert (promotion.model_name, promotion.version, promotion.previous) == ("affinity", "2", "1")
    assert str(client.get_model_version_by_alias("affinity", "champion").version) == "2"
    tags = client.get_model_version("affinity", "2").tags
    assert tags["promoted_by_experiment"] == "exp"
    assert client.get_run(run_id).data.tags["promoted_version"] == "2"


def test_promote_refuses_a_moved_alias_and_a_keep_decision(registry_uri: str) -> None:
    client = _registry(registry_uri)
    _, decision = _better()
    client.set_registered_model_alias("affinity", "challenger", "3")  # not what the arm served
    with pytest.raises(ExperimentError, match="names version 3 now"):
        promote(decision, tracking_uri=registry_uri)
    rng = np.random.default_rng(2)
    keep = decide(_report(_users(rng, 3000, 0.14), _users(rng, 3000, 0.10), min_users=1000))
    with pytest.raises(ExperimentError, match="not to promote"):
        promote(keep, tracking_uri=registry_uri)
    assert str(client.get_model_version_by_alias("affinity", "champion").version) == "1"


# --- the command -----------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="affinity experiment report")
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


def _live_store(uri: str, users: int = 4) -> None:
    """An experiment started now, with answers and clicks just after: the command's default
    period (from the experiment's creation until now) holds them."""
    with EventStore.open(uri) as store:
        ExperimentBook(store).start(_config(min_users=1))
        now = datetime.now(UTC)
        store.record_responses(
            [
                _answer(f"r{n}", f"u{n}", ("control", "challenger")[n % 2], now, version="12")
                for n in range(users)
            ]
        )
        store.append(
            [
                Event(f"e{n}", f"u{n}", "i1", "click", now, recommendation_id=f"r{n}")
                for n in range(0, users, 2)
            ]
        )


def test_command_prints_a_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'events.db'}"
    _live_store(uri)
    assert _run(["exp", "--events-uri", uri, "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "control *" in out and "challenger" in out and "decision: keep the control" in out
    assert "CTR" in out and "100.00%" in out  # control's users u0 and u2 both clicked
    assert _run(["exp", "--events-uri", uri, "--no-mlflow", "--json", "--window", "2h"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["report"]["window_seconds"] == 7200
    arms = {arm["name"]: arm for arm in data["report"]["arms"]}
    assert arms["control"]["clicked_answers"] == 2 and arms["challenger"]["clicked_answers"] == 0
    assert data["decision"]["promote"] is False and data["mlflow_run_id"] is None


def test_command_rejects_user_mistakes_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'events.db'}"
    _live_store(uri)
    for argv, reason in (
        (["nope", "--events-uri", uri, "--no-mlflow"], "no experiment named 'nope'"),
        (["exp", "--events-uri", uri, "--no-mlflow", "--since", "soon"], "--since"),
        (["exp", "--events-uri", uri, "--no-mlflow", "--window=-2h"], "--window"),
        (["exp", "--events-uri", uri, "--no-mlflow", "--window-hours", "0"], "--window-hours"),
        (["exp", "--events-uri", uri, "--no-mlflow", "--arm", "zzz"], "arm: 'zzz'"),
        (["exp", "--events-uri", uri, "--no-mlflow", "--min-users", "0"], "min_users"),
    ):
        assert _run(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err, err


def test_command_logs_and_promotes(
    tmp_path: Path, registry_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _registry(registry_uri)
    uri = f"sqlite:///{tmp_path / 'events.db'}"
    with EventStore.open(uri) as store:
        ExperimentBook(store).start(_config(min_users=20))
        now = datetime.now(UTC)
        answers, events = [], []
        for n in range(60):
            arm = ("control", "challenger")[n % 2]
            answers.append(_answer(f"r{n}", f"u{n}", arm, now, version="1" if n % 2 == 0 else "2"))
            if arm == "challenger" or n % 6 == 0:  # every challenger user clicks, 1 in 3 controls
                events.append(
                    Event(f"e{n}", f"u{n}", "i1", "click", now, recommendation_id=f"r{n}")
                )
        store.record_responses(answers)
        store.append(events)
    argv = ["exp", "--events-uri", uri, "--tracking-uri", registry_uri, "--promote-when-better"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "decision: promote" in out and "promoted: affinity@champion -> version 2" in out
    assert str(client.get_model_version_by_alias("affinity", "champion").version) == "2"
    runs = mlflow.search_runs(experiment_names=["affinity-experiments"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["promoted_version"] == "2"
