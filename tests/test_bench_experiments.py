"""Smoke run of the experiments simulator (``bench/experiments.py``) at a tiny size, so it cannot
rot: the better-challenger runs go through the event store (and are checked against the
simulation inside the run), the A/A runs through the same statistics; plus the pieces whose
numbers can be checked exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import experiments
from service.experiments import BUCKETS, bucket


def test_simulator_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--users", "400", "--items", "60", "--runs", "2", "--aa-runs", "20"]
    argv += ["--min-users", "50", "--control-noise", "2.0", "--challenger-noise", "0.3"]
    argv += ["--results", str(tmp_path)]
    assert experiments.main(argv) == 0
    result = json.loads((tmp_path / "experiments.json").read_text())
    assert result["command"].startswith("python -m bench.experiments --users 400")
    better, aa = result["better_challenger"], result["aa"]
    assert better["runs"] == 2 and aa["runs"] == 20
    assert better["true_lift"] > 0.2  # a much better model, so both runs should promote it
    assert better["promoted"] == 2
    assert 0 <= aa["promoted"] <= aa["interval_excludes_zero"] <= 20
    low, high = aa["rate"]["low"], aa["rate"]["high"]
    assert 0.0 <= low <= aa["rate"]["value"] <= high <= 1.0
    out = capsys.readouterr().out
    assert "| A/A (identical arms) | 20 |" in out and "command: python -m bench.experiments" in out


def test_users_are_assigned_as_the_server_assigns_them() -> None:
    world = experiments.make_world(np.random.default_rng(0), 500, 20, 4)
    config = experiments.experiment_config("x", "salt-1", 10)
    arm_of_user = experiments.assign(world, config)
    for user in (0, 17, 499):
        assert config.arms[arm_of_user[user]].name == config.assign(world.user_ids[user])
    # Half the buckets each: about half the users each.
    assert abs(int((arm_of_user == 0).sum()) - 250) < 50
    assert 0 <= bucket(world.user_ids[0], "salt-1") < BUCKETS


def test_aggregates_apply_the_window_and_count_per_user() -> None:
    world = experiments.make_world(np.random.default_rng(0), 2, 5, 2)
    sessions = experiments.Sessions(
        user=np.array([0, 0, 1]),
        items=np.array([[0, 1], [2, 3], [4, 0]]),
        served=np.zeros(3),
        clicks=np.array([[True, True], [False, True], [False, False]]),
        purchases=np.array([[True, False], [False, True], [False, False]]),
        delay=np.array([[60.0, 120.0], [0.0, 30 * 3600.0], [0.0, 0.0]]),  # the last click is late
    )
    data = experiments.aggregates(world, sessions, np.array([0, 1]), ["a", "b"])
    a, b = data["a"], data["b"]
    assert a.answers.tolist() == [2] and a.clicked.tolist() == [1] and a.clicks.tolist() == [2]
    assert a.converted.tolist() == [1]
    assert a.revenue.tolist() == pytest.approx([world.price[0]])  # the late purchase is not
    assert (b.answers.tolist(), b.clicked.tolist(), b.converted.tolist()) == ([1], [0], [0])
