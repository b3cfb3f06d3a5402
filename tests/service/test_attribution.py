"""Attribution: events credited to the recorded answers they name, by model version, on both
databases (PostgreSQL when ``AFFINITY_TEST_POSTGRES_URI`` is set)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from models.errors import InvalidInputError
from service.attribution import attribution
from service.events import Event, EventStore, Response

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(events_db: str) -> Iterator[EventStore]:
    with EventStore.open(events_db) as opened:
        yield opened


def _answer(rec: str, version: str, at: datetime, user: str = "u1") -> Response:
    return Response(rec, "Recommend", user, ("i1", "i2", "i3"), "personalized", "m", version, at)


def _ev(n: int, rec: str | None, name: str, at: datetime, price: float | None = None) -> Event:
    return Event(
        event_id=f"e{n}",
        user_id="u1",
        item_id="i1",
        event=name,
        timestamp=at,
        recommendation_id=rec,
        price=price,
    )


def test_events_are_credited_to_their_answer_within_the_window(store: EventStore) -> None:
    store.record_responses(
        [
            _answer("r1", "1", T0),
            _answer("r2", "1", T0),
            _answer("r3", "2", T0),
            _answer("r4", "2", T0),
            _answer("r5", "2", T0 + timedelta(minutes=5)),
        ]
    )
    now = T0 + timedelta(days=3)
    outcomes = store.append(
        [
            _ev(1, "r1", "click", T0 + timedelta(minutes=1)),
            _ev(2, "r1", "click", T0 + timedelta(minutes=2)),
            _ev(3, "r1", "purchase", T0 + timedelta(minutes=3), price=10.0),
            _ev(4, "r3", "click", T0 + timedelta(minutes=1)),
            _ev(5, "r3", "purchase", T0 + timedelta(minutes=2), price=5.5),
            _ev(6, "r4", "purchase", T0 + timedelta(minutes=2), price=4.5),
            _ev(7, "r2", "click", T0 + timedelta(days=2)),  # after the 24 h window
            _ev(8, None, "click", T0 + timedelta(minutes=1)),  # no id
            _ev(9, "never-recorded", "click", T0 + timedelta(minutes=1)),
            _ev(10, "r5", "impression", T0 + timedelta(minutes=5)),
        ],
        now=now,
    )
    assert all(o.status.value == "accepted" for o in outcomes)
    report = attribution(store, since=T0 - timedelta(hours=1), until=now)
    by_version = {v.model_version: v for v in report.versions}
    one, two = by_version["1"], by_version["2"]
    assert (one.answers, one.answers_engaged, one.answers_converted) == (2, 1, 1)
    assert one.events == {"click": 2, "purchase": 1} and one.revenue == pytest.approx(10.0)
    assert (two.answers, two.answers_engaged, two.answers_converted) == (3, 1, 2)
    assert two.events == {"click": 1, "purchase": 2, "impression": 1}
    assert two.revenue == pytest.approx(10.0)
    assert two.conversion_rate == pytest.approx(2 / 3)
    assert one.engagement_rate == pytest.approx(0.5)
    assert report.uncredited == {"no_id": 1, "unknown_id": 1, "outside_window": 1}
    as_dict = report.to_dict()
    assert as_dict["versions"][0]["revenue_per_answer"] == pytest.approx(5.0)


def test_attribution_refuses_a_bad_period(store: EventStore) -> None:
    with pytest.raises(InvalidInputError, match="until"):
        attribution(store, since=T0, until=T0 - timedelta(seconds=1))
    with pytest.raises(InvalidInputError, match="timezone"):
        attribution(store, since=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="window"):
        attribution(store, since=T0, window=timedelta(0))
