"""Fuzz the running gRPC server with hypothesis: odd strings, extreme k, thousands of ids, random
filters, random ranking rules (NaN, infinities, extreme integers, odd filters, too many boosts)
and raw malformed protobuf bytes. Every answer must be OK or a documented status code,
never INTERNAL, and the server must keep answering.

``AFFINITY_FUZZ_EXAMPLES`` sets the examples per test (default 60, about 300 cases in all);
``AFFINITY_FUZZ_TARGET=host:port`` fuzzes an already running server instead of an in-process one
(``python -m bench.reliability fuzz`` does both, with a supervised multi-worker server).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.loader import ModelHolder
from tests.service.conftest import N_ITEMS, N_USERS, loaded_model, running, settings_for

EXAMPLES = int(os.environ.get("AFFINITY_FUZZ_EXAMPLES", "60"))
TARGET = os.environ.get("AFFINITY_FUZZ_TARGET", "")
MAX_MESSAGE_BYTES = 1024 * 1024

# The status codes the API documents (protos/affinity/v1/recommender.proto). RESOURCE_EXHAUSTED
# covers messages over the size limit as well as the in-flight limit.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
METHODS = ("Recommend", "SimilarItems", "Popular", "GetModelInfo")

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

known_users = st.sampled_from([f"u{u:02d}" for u in range(N_USERS)])
known_items = st.sampled_from([f"i{i:02d}" for i in range(N_ITEMS)])
# Control characters, NUL, right-to-left marks, emoji: anything that encodes as UTF-8.
odd_text = st.text(st.characters(codec="utf-8"), max_size=40)
huge_text = st.builds(
    lambda char, n: char * n,
    st.characters(codec="utf-8"),
    st.one_of(st.integers(1_000, 20_000), st.integers(250_000, 400_000)),
)
any_id = st.one_of(known_users, known_items, st.just(""), odd_text, huge_text)
k_values = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([-1, 0, 1, 2, 999, 1000, 1001, 2**31 - 1]),
)


def _many_ids(n: int, offset: int) -> list[str]:
    return [f"i{(offset + j) % (N_ITEMS + 5):02d}" for j in range(n)]


id_lists = st.one_of(
    st.lists(st.one_of(known_items, odd_text), max_size=20),
    # Thousands of ids, some unknown (i40-i44), built directly: hypothesis lists are slow.
    st.builds(_many_ids, st.integers(0, 5_000), st.integers(0, 100)),
)
filters = st.builds(
    pb.ItemFilter,
    item_types=st.lists(st.one_of(st.sampled_from(["content", "product"]), odd_text), max_size=5),
    categories=st.lists(st.one_of(st.sampled_from(["a", "b"]), odd_text), max_size=5),
)


# Ranking rules: every field set or not, with values in range, at its edges and far outside.
odd_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.05, 0.1, 0.3, 0.5, 1.0, 1.0000001, 1.5, -1.0, 1e-300, 1e308]),
)
int32s = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 5))
int64s = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 50))
rule_types = st.lists(st.one_of(st.sampled_from(["content", "product"]), odd_text), max_size=3)
rule_categories = st.lists(st.one_of(st.sampled_from(["a", "b"]), odd_text), max_size=3)


@st.composite
def ranking_rules(draw: st.DrawFn, *, user: bool = True) -> pb.RankingRules | None:
    """A random ``RankingRules`` (``None``: no rules field); ``user``: exploration and rotation
    too (on other lists they are INVALID_ARGUMENT, sometimes sent anyway)."""
    if draw(st.booleans()):
        return None
    rules = pb.RankingRules()
    maybe = st.booleans()
    if draw(maybe):
        rules.diversity.SetInParent()
        if draw(maybe):
            rules.diversity.max_per_category = draw(int32s)
        if draw(maybe):
            rules.diversity.mmr = draw(odd_floats)
    for _ in range(draw(st.one_of(st.integers(0, 3), st.sampled_from([32, 33, 40])))):
        rules.boosts.add(
            item_types=draw(rule_types), categories=draw(rule_categories), factor=draw(odd_floats)
        )
    rules.no_boosts = draw(st.booleans())
    if draw(maybe):
        rules.promotion.SetInParent()
        rules.promotion.item_types.extend(draw(rule_types))
        rules.promotion.categories.extend(draw(rule_categories))
        if draw(maybe):
            rules.promotion.share = draw(odd_floats)
    if user or draw(st.integers(0, 9)) == 0:
        if draw(maybe):
            ex = rules.exploration
            ex.SetInParent()
            if draw(maybe):
                ex.share = draw(odd_floats)
            if draw(maybe):
                ex.max_age_days = draw(odd_floats)
            if draw(maybe):
                ex.seed = draw(int64s)
            if draw(maybe):
                ex.max_interactions = draw(int64s)
        if draw(maybe):
            rules.rotation.SetInParent()
            if draw(maybe):
                rules.rotation.rate = draw(odd_floats)
            if draw(maybe):
                rules.rotation.half_life_seconds = draw(odd_floats)
    return rules


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (the wire type of strings and messages)."""
    size, out = len(payload), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        out.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([number << 3 | 2]) + bytes(out) + payload


# Raw request bodies: random bytes, plus well-formed framing around non-UTF-8 string contents
# (the wire allows any bytes in a string field; proto3 parsers must refuse them).
raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(_field, st.integers(1, 6), st.binary(max_size=50)),
    st.builds(lambda a, b: a + b, st.binary(max_size=20), st.binary(max_size=20)),
)


@pytest.fixture(scope="module")
def channel(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    options = [
        ("grpc.max_send_message_length", 8 * MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", 8 * MAX_MESSAGE_BYTES),
    ]
    if TARGET:
        with grpc.insecure_channel(TARGET, options=options) as chan:
            yield chan
        return
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    config = settings_for(
        artifact_dir,
        tmp_path_factory.mktemp("fuzz"),
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_in_flight=64,
        rules_rotation_allowed=True,  # a request's rotation is resolved, not refused outright
    )
    with running(config, holder) as port, grpc.insecure_channel(f"127.0.0.1:{port}", options) as c:
        yield c


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(channel)


def _internal_count() -> float:
    return sum(
        REGISTRY.get_sample_value("affinity_requests_total", {"method": m, "code": "INTERNAL"})
        or 0.0
        for m in METHODS
    )


@pytest.fixture(scope="module", autouse=True)
def _no_internal_errors_and_still_serving(channel: grpc.Channel) -> Iterator[None]:
    before = _internal_count()
    yield
    assert _internal_count() == before  # a swallowed INTERNAL would hide here
    answer = pb_grpc.RecommenderStub(channel).Popular(pb.PopularRequest(k=3), timeout=10)
    assert len(answer.items) == 3


def _code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        assert code in DOCUMENTED, f"{code}: {exc.details()}"  # type: ignore[attr-defined]
        return code
    return grpc.StatusCode.OK


@FUZZ
@given(
    user_id=any_id,
    k=k_values,
    recent=id_lists,
    exclude=id_lists,
    item_filter=filters,
    include_seen=st.booleans(),
    rules=ranking_rules(),
)
def test_recommend_fuzz(
    stub: pb_grpc.RecommenderStub,
    user_id: str,
    k: int,
    recent: list[str],
    exclude: list[str],
    item_filter: pb.ItemFilter,
    include_seen: bool,
    rules: pb.RankingRules | None,
) -> None:
    request = pb.RecommendRequest(
        user_id=user_id,
        k=k,
        recent_item_ids=recent,
        exclude_item_ids=exclude,
        filter=item_filter,
        include_seen=include_seen,
        rules=rules,
    )
    code = _code_of(lambda: stub.Recommend(request, timeout=30))
    if (
        1 <= k <= 50
        and len(recent) <= 1000
        and len(exclude) <= 1000
        and not item_filter.ListFields()
        and rules is None
    ):
        # A valid request for any user (known, unknown, odd) gets an answer: fold-in or popular.
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


@FUZZ
@given(
    items=id_lists,
    k=k_values,
    exclude=id_lists,
    item_filter=filters,
    rules=ranking_rules(user=False),
)
def test_similar_items_fuzz(
    stub: pb_grpc.RecommenderStub,
    items: list[str],
    k: int,
    exclude: list[str],
    item_filter: pb.ItemFilter,
    rules: pb.RankingRules | None,
) -> None:
    request = pb.SimilarItemsRequest(
        item_ids=items, k=k, exclude_item_ids=exclude, filter=item_filter, rules=rules
    )
    code = _code_of(lambda: stub.SimilarItems(request, timeout=30))
    if not items or not 1 <= k <= 1000:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(
    k=k_values,
    exclude=id_lists,
    item_filter=filters,
    trending=st.booleans(),
    rules=ranking_rules(user=False),
)
def test_popular_fuzz(
    stub: pb_grpc.RecommenderStub,
    k: int,
    exclude: list[str],
    item_filter: pb.ItemFilter,
    trending: bool,
    rules: pb.RankingRules | None,
) -> None:
    request = pb.PopularRequest(
        k=k, exclude_item_ids=exclude, filter=item_filter, trending=trending, rules=rules
    )
    code = _code_of(lambda: stub.Popular(request, timeout=30))
    if not 1 <= k <= 1000:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(method=st.sampled_from(METHODS), body=raw_bodies)
def test_raw_bytes_fuzz(channel: grpc.Channel, method: str, body: bytes) -> None:
    # No serializers: the bytes go on the wire exactly as generated.
    call = channel.unary_unary(f"/affinity.v1.Recommender/{method}")
    _code_of(lambda: call(body, timeout=30))


def test_invalid_utf8_in_a_string_field_is_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/affinity.v1.Recommender/Recommend")
    body = _field(1, b"\xff\xfe bad") + bytes([2 << 3, 5])  # user_id, k=5
    assert _code_of(lambda: call(body, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    valid = pb.RecommendRequest(user_id="u01", k=5).SerializeToString()
    assert pb.RecommendResponse.FromString(call(valid, timeout=10)).items
