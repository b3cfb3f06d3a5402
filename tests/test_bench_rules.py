"""The rules benchmark's servers (``bench/rules.py``): ``off`` switches every rule off whatever
the shipped defaults are, and ``defaults`` takes them as shipped, so ``defaults`` / ``off`` is
the cost of the default rules; and the shipped defaults switch every rule off."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from bench import rules as bench_rules
from bench.common import tiny_artifact
from service.config import ServeSettings
from service.rules import RuleDefaults, RuleResolver


def _resolver(settings: dict[str, str], artifact: Path) -> RuleResolver:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AFFINITY_RULES_")}
    with mock.patch.dict(os.environ, {**clean, **settings}, clear=True):
        config = ServeSettings(model_uri=str(artifact), poll_seconds=0)
    return RuleResolver(RuleDefaults.from_settings(config))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_artifact(tmp_path_factory.mktemp("tiny") / "artifact")


def test_the_shipped_defaults_switch_every_rule_off(artifact: Path) -> None:
    servers = bench_rules.variants(artifact)
    assert servers["defaults"][1] == {}
    assert _resolver(servers["defaults"][1], artifact).off


def test_off_switches_off_every_rule_the_others_switch_on(artifact: Path) -> None:
    servers = bench_rules.variants(artifact)
    assert _resolver(servers["off"][1], artifact).off
    for name in ("on", "cap", "mmr", "boost", "promotion"):
        on = servers[name][1]
        assert not _resolver(on, artifact).off, name
        # off's settings win over every rule the variant switches on.
        assert _resolver({**on, **servers["off"][1]}, artifact).off, name
    exploring = {"AFFINITY_RULES_EXPLORE_SHARE": "0.1", "AFFINITY_RULES_ROTATION_RATE": "0.2"}
    exploring["AFFINITY_RULES_ROTATION_ALLOWED"] = "true"
    assert not _resolver(exploring, artifact).off
    assert _resolver({**exploring, **servers["off"][1]}, artifact).off
