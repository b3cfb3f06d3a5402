"""Each item's first appearance (``ItemCatalog.first_seen``, the age exploration uses): the
earliest interaction of the log, unless the ``--items`` catalog gives ``first_seen`` or
``created_at``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.artifact import ItemCatalog
from models.errors import DataError
from models.vocabulary import Vocabulary
from training.data import catalog_arrays, load_catalog, load_interactions
from training.pipeline import _with_first_seen

LOG = (
    "user_id,item_id,event,timestamp,value\n"
    "u1,i1,view,1704067200,1\n"
    "u2,i1,view,1704000000,1\n"
    "u1,i2,view,2024-01-05T00:00:00Z,1\n"
    "u3,i3,view,1704500000,1\n"
    "u3,i2,view,1704600000,1\n"
)


def test_first_seen_is_the_earliest_interaction_unless_the_catalog_says(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    items = tmp_path / "items.csv"
    items.write_text(
        "item_id,category,created_at\ni1,news,\ni3,news,2023-12-01T00:00:00Z\ni9,news,5\n"
    )
    frame = load_interactions(log, categorical=True).frame
    vocab = Vocabulary(["i1", "i2", "i3", "i4"], kind="item")
    catalog = _with_first_seen(catalog_arrays(vocab.ids, load_catalog(items)), frame, vocab)
    assert catalog.first_seen[0] == 1704000000  # its earlier interaction
    assert catalog.first_seen[1] == 1704412800  # 2024-01-05, ISO in the log
    assert catalog.first_seen[2] == 1701388800  # the catalog's created_at wins
    assert np.isnan(catalog.first_seen[3])  # no interaction, nothing in the catalog
    plain = _with_first_seen(ItemCatalog.empty(4), frame, vocab)
    assert plain.first_seen[2] == 1704500000


def test_a_catalog_first_seen_that_is_not_a_time_names_the_line(tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item_id,first_seen\ni1,1704067200\ni2,yesterday\n")
    with pytest.raises(DataError, match=r"first_seen.*line 3"):
        load_catalog(items)
    items.write_text("item_id,first_seen\ni1,1704067200\ni2,\n")
    catalog = load_catalog(items)
    assert catalog["first_seen"].iloc[0] == 1704067200 and np.isnan(catalog["first_seen"].iloc[1])
