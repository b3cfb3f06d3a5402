"""Ranking rules as ``batch-recommend`` flags and as pyfunc parameters: the same texts make the
same :class:`~models.rules.Rules`, and bad ones are refused naming what is wrong.

That the lists themselves agree (batch, pyfunc, offline evaluation) is
``tests/test_ranking_paths.py``'s check on a trained, registered model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import models.ranking as ranking
import models.rules as rules_module
from affinity.cli import main
from models.errors import InvalidInputError
from models.ranking import ItemFilter
from models.rules import Boost, Diversity, Exploration, Promotion, Rules
from registry.pyfunc_model import rules_from_params
from training.batch import DEFAULT_EXPLORE_MAX_AGE_DAYS, parse_filter_spec, rules_from_options


@pytest.mark.parametrize(
    ("text", "item_filter", "number"),
    [
        ("shoes=1.5", ItemFilter.of(categories=["shoes"]), 1.5),
        ("category:shoes=3", ItemFilter.of(categories=["shoes"]), 3.0),
        ("type:product=0.2", ItemFilter.of(["product"]), 0.2),
        ("hats, type:product ,category:shoes=2", ItemFilter.of(["product"], ["hats", "shoes"]), 2),
        ("a=b=0.5", ItemFilter.of(categories=["a=b"]), 0.5),  # the number follows the last "="
    ],
)
def test_filter_specs(text: str, item_filter: ItemFilter, number: float) -> None:
    assert parse_filter_spec(text, "boost") == (item_filter, number)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shoes", "expected"),
        ("=2", "expected"),
        ("shoes=lots", "not a number"),
        ("brand:acme=2", "category:NAME or type:NAME"),
        ("category:=2", "category:NAME or type:NAME"),
    ],
)
def test_bad_filter_specs_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        parse_filter_spec(text, "promote")
    assert caught.value.field == "promote"
    with pytest.raises(ValueError, match=message):
        rules_from_params(ranking, rules_module, {"promote": text})


FULL_OPTIONS: dict[str, Any] = {
    "diversity_cap": 3,
    "mmr": 0.3,
    "boosts": ["category:home=1.5", "type:content=0.5"],
    "promote": "toys=0.2",
    "explore": 0.1,
    "explore_max_age_days": 14.0,
    "explore_seed": 7,
    "explore_max_interactions": 5,
}
FULL_RULES = Rules(
    diversity=Diversity(max_per_category=3, mmr=0.3),
    boosts=(
        Boost(ItemFilter.of(categories=["home"]), 1.5),
        Boost(ItemFilter.of(["content"]), 0.5),
    ),
    promotion=Promotion(ItemFilter.of(categories=["toys"]), 0.2),
    exploration=Exploration(share=0.1, max_age_days=14.0, seed=7, max_interactions=5),
)


def _unsettled(rules: Rules | None) -> Rules | None:
    """``rules`` without the exploration's clock (the pyfunc reads it once per call)."""
    if rules is None or rules.exploration is None:
        return rules
    return replace(rules, exploration=replace(rules.exploration, now=None))


def test_flags_and_pyfunc_params_make_the_same_rules() -> None:
    assert rules_from_options(**FULL_OPTIONS) == FULL_RULES
    from_params = rules_from_params(ranking, rules_module, dict(FULL_OPTIONS))
    assert from_params is not None and from_params.exploration is not None
    assert from_params.exploration.now is not None  # settled: one clock for the whole call
    assert _unsettled(from_params) == FULL_RULES


def test_no_rules_and_defaults() -> None:
    assert rules_from_options() is None
    # The pyfunc's parameter defaults (the logged signature's) ask for nothing either.
    defaults = {
        "diversity_cap": 0,
        "mmr": 0.0,
        "boosts": [],
        "promote": "",
        "explore": 0.0,
        "explore_max_age_days": 90.0,
        "explore_seed": 0,
        "explore_max_interactions": -1,
    }
    assert rules_from_params(ranking, rules_module, defaults) is None
    assert rules_from_params(ranking, rules_module, {}) is None
    explore = rules_from_options(explore=0.05)
    assert explore is not None and explore.exploration is not None
    assert explore.exploration.max_age_days == DEFAULT_EXPLORE_MAX_AGE_DAYS
    params = {"explore": 0.05, "explore_max_interactions": -1}
    assert _unsettled(rules_from_params(ranking, rules_module, params)) == explore


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"mmr": 2.0}, "rules.diversity.mmr"),
        ({"diversity_cap": -1}, "rules.diversity.max_per_category"),
        ({"boosts": ["home=0"]}, "rules.boosts.factor"),
        ({"promote": "toys=1.5"}, "rules.promotion.share"),
        ({"explore": 0.1, "explore_max_age_days": 0.0}, "rules.exploration.max_age_days"),
        ({"promote": "toys=0.6", "explore": 0.6}, "rules.exploration.share"),
    ],
)
def test_bad_rules_name_their_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        rules_from_options(**options)
    assert caught.value.field == field
    with pytest.raises(InvalidInputError, match=field):
        rules_from_params(ranking, rules_module, options)


def test_bad_rule_flags_fail_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.txt"
    users.write_text("u1\n")
    argv = ["batch-recommend", "--model", str(tmp_path / "no-such-model"), "--users", str(users)]
    argv += ["--out", str(tmp_path / "out.csv"), "--mmr", "1.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rules.diversity.mmr" in err and "Traceback" not in err
    assert main([*argv[:-2], "--boost", "brand:acme=2"]) == 2
    assert "category:NAME or type:NAME" in capsys.readouterr().err
