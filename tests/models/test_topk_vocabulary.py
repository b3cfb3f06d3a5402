"""Top-k selection and id vocabularies: the two primitives every query goes through."""

from __future__ import annotations

import numpy as np
import pytest

from models.base import topk
from models.errors import InvalidInputError, NotFoundError
from models.vocabulary import MISSING, Vocabulary


def test_topk_orders_best_first_and_breaks_ties_by_index() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9, -1.0]], dtype=np.float32)
    ids, top = topk(scores, 3)
    assert ids.tolist() == [[1, 3, 2]]
    assert top[0].tolist() == pytest.approx([0.9, 0.9, 0.5])


def test_topk_marks_missing_candidates() -> None:
    scores = np.array([[-np.inf, 2.0, -np.inf]], dtype=np.float32)
    ids, top = topk(scores, 3)
    assert ids.tolist() == [[1, -1, -1]]
    assert np.isneginf(top[0, 1:]).all()


def test_topk_matches_full_sort_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((4, 1000)).astype(np.float32)
    ids, _ = topk(scores, 10)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert (ids == expected).all()


def test_vocabulary_round_trip_and_unknown_ids() -> None:
    vocab = Vocabulary(["u1", "u2", "u3"], kind="user")
    assert vocab.index("u2") == 1
    assert vocab.lookup(["u3", "nobody"]).tolist() == [2, MISSING]
    assert vocab.decode(np.array([2, 0])) == ["u3", "u1"]
    with pytest.raises(NotFoundError, match="unknown user id 'nobody'"):
        vocab.index("nobody")
    assert Vocabulary.from_array(vocab.to_array(), kind="user").ids.tolist() == ["u1", "u2", "u3"]


def test_vocabulary_rejects_duplicates() -> None:
    with pytest.raises(InvalidInputError, match="unique"):
        Vocabulary(["a", "a"])
