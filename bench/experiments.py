"""Experiments simulator: does the promotion rule find a better challenger, and how often does
it promote a challenger that is no better (A/A)?

A synthetic population with true tastes from a held-out model: true low-rank user and item
factors give every (user, item) a true score; the chance that a user clicks an item shown at
position ``j`` is ``sigmoid(BIAS + true score + user offset) / log2(j + 2)``. Users differ in
activity (``1 + Poisson(rate)`` lists each, the rates log-normal) and in their offset, so one
user's clicks go together, as real users' do. A click turns into a purchase with probability
:data:`PURCHASE`, at the item's price; a share :data:`LATE` of the clicks comes days later,
outside the attribution window.

The arms' models estimate the truth with noise: each ranks items by ``(U + e1) (V + e2)^T``, the
true factors plus Gaussian noise; the control's noise is larger (``--control-noise``) than the
challenger's (``--challenger-noise``), so the challenger is truly better by a known amount.
Users are assigned by :func:`service.experiments.bucket` and the allocation of an
:class:`~service.experiments.ExperimentConfig` (:func:`~service.experiments.reallocate`).

* **Better challenger** (``--runs``, each with its own salt and behaviour): through the real path.
  The experiment is started in a SQLite event store (:class:`~service.experiments.ExperimentBook`),
  every answer recorded with its experiment and arm, every click and purchase appended as an
  event naming the answer; :func:`service.experiment_report.experiment_report` and
  :func:`~service.experiment_report.decide` decide. The per-user aggregates computed here from
  the simulated behaviour are checked equal to those the store's query returns.
* **A/A** (``--aa-runs``): both arms show the control model's lists, a new salt and new
  behaviour each run; the per-user aggregates go straight into the same
  :func:`~service.experiment_report.summarize` and :func:`~service.experiment_report.decide`.

Prints the rates with their exact binomial (Clopper-Pearson) 95% intervals and the command, and
writes them to ``<results>/experiments.json``::

    python -m bench.experiments --users 10000 --runs 40 --aa-runs 1000
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from service.attribution import DEFAULT_WINDOW
from service.events import EventStore, RawEvent, Response
from service.experiment_report import ArmData, decide, experiment_report, summarize
from service.experiments import (
    ExperimentBook,
    ExperimentConfig,
    bucket,
    parse_config,
    reallocate,
)

RESULTS = Path(__file__).resolve().parent / "results"
BIAS = -4.0
"""Logit of a click on an item of true score 0, for a user of offset 0, at the top position."""
PURCHASE = 0.15
"""Chance that a click becomes a purchase."""
LATE = 0.03
"""Share of clicks (and their purchases) that come 25 to 72 hours after the answer."""
PURCHASE_DELAY = 600.0
"""Seconds from a click to its purchase."""
PERIOD = timedelta(days=7)
T0 = datetime(2026, 11, 1, tzinfo=UTC)
MODEL = "affinity"


# --- the world --------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The population and catalog: true factors, per-user activity and offset, prices."""

    user_factors: np.ndarray
    item_factors: np.ndarray
    offset: np.ndarray
    """Per-user logit offset (some users click more than others)."""
    rate: np.ndarray
    """Per-user expected lists beyond the first."""
    price: np.ndarray

    @property
    def users(self) -> int:
        return len(self.offset)

    @property
    def user_ids(self) -> list[str]:
        return [f"u{u:07d}" for u in range(self.users)]


def make_world(rng: np.random.Generator, users: int, items: int, dim: int) -> World:
    return World(
        user_factors=rng.normal(0.0, 1.0, (users, dim)),
        item_factors=rng.normal(0.0, 1.0 / np.sqrt(dim), (items, dim)),
        offset=rng.normal(0.0, 0.8, users),
        rate=rng.lognormal(0.5, 1.0, users),
        price=np.round(rng.lognormal(3.0, 0.6, items), 2),
    )


def model_lists(world: World, rng: np.random.Generator, noise: float, k: int) -> np.ndarray:
    """Every user's top-``k`` items by a model that knows the true factors up to ``noise``."""
    users = world.user_factors + rng.normal(0.0, noise, world.user_factors.shape)
    items = world.item_factors + rng.normal(
        0.0, noise / np.sqrt(world.item_factors.shape[1]), world.item_factors.shape
    )
    scores = users @ items.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def click_probability(world: World, lists: np.ndarray) -> np.ndarray:
    """The true chance of a click on each listed item, by position."""
    true = np.einsum("ud,ukd->uk", world.user_factors, world.item_factors[lists])
    position = 1.0 / np.log2(np.arange(lists.shape[1]) + 2.0)
    return position / (1.0 + np.exp(-(BIAS + true + world.offset[:, None])))


def true_ctr(world: World, probability: np.ndarray) -> float:
    """Expected clicked answers per answer: users weighted by their expected lists, a click
    counting when it comes within the window."""
    any_click = 1.0 - np.prod(1.0 - probability * (1.0 - LATE), axis=1)
    weight = 1.0 + world.rate
    return float((weight * any_click).sum() / weight.sum())


# --- behaviour --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sessions:
    """Every list shown during one experiment and what the user did with it."""

    user: np.ndarray
    """(S,) the user of each list."""
    items: np.ndarray
    """(S, k) the items shown."""
    served: np.ndarray
    """(S,) seconds after the experiment began."""
    clicks: np.ndarray
    """(S, k) clicked."""
    purchases: np.ndarray
    """(S, k) bought (after a click)."""
    delay: np.ndarray
    """(S, k) seconds from the answer to the click."""


def simulate(
    world: World, lists: np.ndarray, probability: np.ndarray, rng: np.random.Generator
) -> Sessions:
    """Each user's lists (their arm's list every time) and clicks."""
    per_user = 1 + rng.poisson(world.rate)
    user = np.repeat(np.arange(world.users), per_user)
    shape = (len(user), lists.shape[1])
    clicks = rng.random(shape) < probability[user]
    purchases = clicks & (rng.random(shape) < PURCHASE)
    late = rng.random(shape) < LATE
    delay = np.where(late, rng.uniform(25 * 3600, 72 * 3600, shape), rng.exponential(3600, shape))
    served = rng.uniform(0.0, PERIOD.total_seconds() - 1.0, len(user))
    return Sessions(user, lists[user], served, clicks, purchases, delay)


def aggregates(
    world: World, sessions: Sessions, arm_of_user: np.ndarray, names: list[str]
) -> dict[str, ArmData]:
    """Per arm, per user (in user id order): what the store's query computes, from the
    simulation directly."""
    window = DEFAULT_WINDOW.total_seconds()
    credited = sessions.clicks & (sessions.delay <= window)
    bought = sessions.purchases & (sessions.delay + PURCHASE_DELAY <= window)
    n = world.users
    user = sessions.user
    answers = np.bincount(user, minlength=n)
    clicked = np.bincount(user, weights=credited.any(axis=1), minlength=n)
    clicks = np.bincount(user, weights=credited.sum(axis=1), minlength=n)
    converted = np.bincount(user, weights=bought.any(axis=1), minlength=n) > 0
    spent = (bought * world.price[sessions.items]).sum(axis=1)
    revenue = np.bincount(user, weights=spent, minlength=n)
    out = {}
    for index, name in enumerate(names):
        mask = arm_of_user == index
        out[name] = ArmData.of(
            answers[mask], clicked[mask], clicks[mask], converted[mask], revenue[mask]
        )
    return out


def assign(world: World, config: ExperimentConfig) -> np.ndarray:
    """Each user's arm (an index into ``config.arms``), as the server assigns it."""
    arms = config.bucket_arms()
    return np.array([arms[bucket(user, config.salt)] for user in world.user_ids])


def experiment_config(name: str, salt: str, min_users: int) -> ExperimentConfig:
    config = parse_config(
        {
            "name": name,
            "salt": salt,
            "arms": [
                {"name": "control", "model": "champion", "share": 0.5},
                {"name": "challenger", "model": "challenger", "share": 0.5},
            ],
            "primary_metric": "ctr",
            "min_users": min_users,
        }
    )
    config.allocation = reallocate(config.arms)
    return config


# --- the runs ---------------------------------------------------------------------------------


def record(
    store: EventStore,
    world: World,
    sessions: Sessions,
    config: ExperimentConfig,
    arm_of_user: np.ndarray,
    run: int,
) -> None:
    """Every answer and event of ``sessions`` into ``store``, as the server would record them."""
    ids = world.user_ids
    names = [arm.name for arm in config.arms]
    version = {"control": "1", "challenger": "2"}
    responses, events = [], []
    for s in range(len(sessions.user)):
        user = int(sessions.user[s])
        arm = names[arm_of_user[user]]
        rid = f"x{run}-{s}"
        served = T0 + timedelta(seconds=float(sessions.served[s]))
        shown = sessions.items[s]
        responses.append(
            Response(
                rid,
                "Recommend",
                ids[user],
                tuple(f"i{i}" for i in shown),
                "personalized",
                MODEL,
                version[arm],
                served,
                experiment=config.name,
                arm=arm,
            )
        )
        for j in np.flatnonzero(sessions.clicks[s]):
            at = served + timedelta(seconds=float(sessions.delay[s, j]))
            item = f"i{shown[j]}"
            events.append(RawEvent(f"c{rid}-{j}", ids[user], item, "click", at, 1.0, None, rid))
            if sessions.purchases[s, j]:
                bought = at + timedelta(seconds=PURCHASE_DELAY)
                price = float(world.price[shown[j]])
                events.append(
                    RawEvent(f"p{rid}-{j}", ids[user], item, "purchase", bought, 1.0, price, rid)
                )
    store.record_responses(responses)
    for start in range(0, len(events), 5000):
        store.append(events[start : start + 5000], now=T0 + PERIOD + timedelta(days=30))


def better_runs(args: argparse.Namespace, world: World, workdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + 1)
    control = model_lists(world, rng, args.control_noise, args.k)
    challenger = model_lists(world, rng, args.challenger_noise, args.k)
    p_control, p_challenger = (
        click_probability(world, control),
        click_probability(world, challenger),
    )
    truth = {"control": true_ctr(world, p_control), "challenger": true_ctr(world, p_challenger)}
    promoted, lifts, seconds = 0, [], []
    for run in range(args.runs):
        config = experiment_config(f"better-{run}", f"better-salt-{run}", args.min_users)
        arm_of_user = assign(world, config)
        is_challenger = (arm_of_user == 1)[:, None]
        lists = np.where(is_challenger, challenger, control)
        probability = np.where(is_challenger, p_challenger, p_control)
        sessions = simulate(world, lists, probability, np.random.default_rng([args.seed, run]))
        started = time.perf_counter()
        with EventStore.open(f"sqlite:///{workdir / f'better-{run}.db'}") as store:
            ExperimentBook(store).start(config)
            record(store, world, sessions, config, arm_of_user, run)
            report = experiment_report(store, config.name, since=T0, until=T0 + PERIOD)
        decision = decide(report)
        seconds.append(time.perf_counter() - started)
        direct = aggregates(world, sessions, arm_of_user, ["control", "challenger"])
        _check_same(report.config.name, direct, report)
        promoted += decision.promote
        lift = report.comparison("challenger", "ctr").lift.value
        lifts.append(lift)
        print(
            f"run {run}: users {report.arm('control').users}/{report.arm('challenger').users}, "
            f"CTR lift {100 * lift:+.1f}%, {'promote' if decision.promote else 'keep'}",
            file=sys.stderr,
        )
    return {
        "runs": args.runs,
        "promoted": promoted,
        "rate": _rate(promoted, args.runs),
        "true_ctr": truth,
        "true_lift": truth["challenger"] / truth["control"] - 1.0,
        "mean_observed_lift": float(np.mean(lifts)) if lifts else None,
        "seconds_per_run_through_the_store": float(np.mean(seconds)) if seconds else None,
    }


def _check_same(name: str, direct: dict[str, ArmData], report: Any) -> None:
    """The store's per-user query must give what the simulation says happened."""
    for arm in ("control", "challenger"):
        expected = direct[arm]
        summary = report.arm(arm)
        totals = (
            int(expected.answers.sum()),
            int(expected.clicked.sum()),
            int(expected.clicks.sum()),
            int(np.count_nonzero(expected.converted)),
            round(float(expected.revenue.sum()), 6),
            expected.users,
        )
        stored = (
            summary.answers,
            summary.clicked,
            summary.clicks,
            summary.converters,
            round(summary.revenue, 6),
            summary.users,
        )
        if totals != stored:
            raise RuntimeError(
                f"{name}, arm {arm}: the store says {stored}, the simulation {totals}"
            )


def aa_runs(args: argparse.Namespace, world: World) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + 2)
    lists = model_lists(world, rng, args.control_noise, args.k)
    probability = click_probability(world, lists)
    promoted = excluded = 0
    for run in range(args.aa_runs):
        config = experiment_config(f"aa-{run}", f"aa-salt-{run}", args.min_users)
        arm_of_user = assign(world, config)
        sessions = simulate(
            world, lists, probability, np.random.default_rng([args.seed, 10**6 + run])
        )
        data = aggregates(world, sessions, arm_of_user, ["control", "challenger"])
        report = summarize(config, data, since=T0, until=T0 + PERIOD)
        decision = decide(report)
        promoted += decision.promote
        diff = report.comparison("challenger", "ctr").difference
        excluded += not (diff.low <= 0 <= diff.high)
    return {
        "runs": args.aa_runs,
        "promoted": promoted,
        "rate": _rate(promoted, args.aa_runs),
        "interval_excludes_zero": excluded,
        "two_sided_rate": _rate(excluded, args.aa_runs),
    }


def _rate(k: int, n: int) -> dict[str, float | None]:
    if n == 0:
        return {"value": None, "low": None, "high": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"value": k / n, "low": float(ci.low), "high": float(ci.high)}


def _pct(rate: dict[str, float | None]) -> str:
    if rate["value"] is None:
        return "-"
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"  # type: ignore[operator]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("--users", type=int, default=10000, help="population (both arms)")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--dim", type=int, default=16, help="true factors")
    parser.add_argument("--k", type=int, default=10, help="items per list")
    parser.add_argument("--control-noise", type=float, default=1.5)
    parser.add_argument("--challenger-noise", type=float, default=1.35)
    parser.add_argument(
        "--runs", type=int, default=40, help="better-challenger experiments, through the store"
    )
    parser.add_argument("--aa-runs", type=int, default=1000, help="A/A experiments")
    parser.add_argument("--min-users", type=int, default=1000, help="the experiments' min_users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(RESULTS), help="where experiments.json goes")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.experiments", *given])
    world = make_world(np.random.default_rng(args.seed), args.users, args.items, args.dim)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="affinity-experiments-") as tmp:
        better = better_runs(args, world, Path(tmp))
    aa = aa_runs(args, world)
    result = {
        "command": command,
        "parameters": {k: v for k, v in vars(args).items() if k != "results"},
        "better_challenger": better,
        "aa": aa,
        "seconds": time.perf_counter() - started,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "experiments.json").write_text(json.dumps(result, indent=2) + "\n")
    truth = better["true_ctr"]
    print(f"command: {command}")
    print()
    print("| experiment | runs | promoted | rate [95% exact] |")
    print("|---|---:|---:|---|")
    print(
        f"| better challenger (true CTR {100 * truth['control']:.2f}% -> "
        f"{100 * truth['challenger']:.2f}%, lift {100 * better['true_lift']:+.1f}%) "
        f"| {better['runs']} | {better['promoted']} | {_pct(better['rate'])} |"
    )
    print(f"| A/A (identical arms) | {aa['runs']} | {aa['promoted']} | {_pct(aa['rate'])} |")
    print(
        f"| A/A, CTR interval excludes zero either way | {aa['runs']} | "
        f"{aa['interval_excludes_zero']} | {_pct(aa['two_sided_rate'])} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
