"""TLS and bearer-token auth: the right credentials are accepted, anything else refused."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from models.ranking import RankingPipeline
from service.client import AffinityClient
from service.loader import ModelHolder
from tests.service.conftest import client_for, loaded_model, running, settings_for, status_of

TOKEN = "s3cret-token"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def secure_port(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, bytes]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(tmp)
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    settings = settings_for(artifact_dir, tmp, tls_cert=cert, tls_key=key, token=TOKEN)
    with running(settings, holder) as port:
        yield port, cert.read_bytes()


def _tls_client(port: int, roots: bytes, token: str | None) -> AffinityClient:
    return AffinityClient(f"localhost:{port}", token=token, root_certificates=roots, timeout=5)


def test_tls_with_the_right_token_is_answered(secure_port: tuple[int, bytes]) -> None:
    port, roots = secure_port
    with _tls_client(port, roots, TOKEN) as client:
        assert len(client.recommend("u01", k=3).items) == 3
        assert client.model_info().num_items == 40


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(
    secure_port: tuple[int, bytes], token: str | None
) -> None:
    port, roots = secure_port
    with _tls_client(port, roots, token) as client:
        assert status_of(lambda: client.recommend("u01", k=3)) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(client.model_info) == grpc.StatusCode.UNAUTHENTICATED
        assert client.health() == "SERVING"  # probes need no token


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_port: tuple[int, bytes]) -> None:
    port, _ = secure_port
    with client_for(port, token=TOKEN, timeout=2) as client:
        assert status_of(client.model_info) == grpc.StatusCode.UNAVAILABLE


def test_client_rejects_a_server_certificate_it_does_not_trust(
    secure_port: tuple[int, bytes], tmp_path: Path
) -> None:
    port, _ = secure_port
    other_cert, _ = _self_signed(tmp_path)
    with _tls_client(port, other_cert.read_bytes(), TOKEN) as client:
        assert status_of(client.model_info) == grpc.StatusCode.UNAVAILABLE


def test_token_is_never_logged(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    settings = settings_for(artifact_dir, tmp_path, token=TOKEN)
    caplog.set_level("DEBUG")
    with running(settings, holder) as port:
        with client_for(port, token=TOKEN) as good:
            good.recommend("u01", k=2)
        with client_for(port, token="guess") as bad:
            status_of(lambda: bad.recommend("u01", k=2))
    assert TOKEN not in caplog.text
    assert "guess" not in caplog.text
    assert TOKEN not in repr(settings)


def test_token_is_compared_in_constant_time(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A timing measurement would be flaky; instead prove every check goes through
    # hmac.compare_digest (constant time for equal-length inputs, no early exit on a prefix).
    import hmac

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    settings = settings_for(artifact_dir, tmp_path, token=TOKEN)
    with running(settings, holder) as port:
        with client_for(port, token=TOKEN[:-1] + "X") as near_miss:
            assert status_of(near_miss.model_info) == grpc.StatusCode.UNAUTHENTICATED
        with client_for(port, token=TOKEN) as good:
            assert good.model_info().num_items == 40
    given = [a for a, _ in seen]
    assert f"Bearer {TOKEN[:-1]}X".encode() in given
    assert f"Bearer {TOKEN}".encode() in given
    assert all(b == f"Bearer {TOKEN}".encode() for _, b in seen)


@pytest.fixture
def limited_port(pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path) -> Iterator[int]:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    settings = settings_for(
        artifact_dir, tmp_path, max_k=20, max_ids=10, max_message_bytes=64 * 1024
    )
    with running(settings, holder) as port:
        yield port


def test_oversized_message_is_refused_and_the_server_keeps_answering(limited_port: int) -> None:
    with client_for(limited_port, timeout=5) as client:
        huge = "u" * (128 * 1024)
        code = status_of(lambda: client.recommend(huge, k=3))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(client.recommend("u01", k=3).items) == 3


def test_k_and_id_count_limits(limited_port: int) -> None:
    with client_for(limited_port, timeout=5) as client:
        assert len(client.recommend("u01", k=20).items) == 20
        assert status_of(lambda: client.recommend("u01", k=21)) == grpc.StatusCode.INVALID_ARGUMENT
        ids = [f"i{i:02d}" for i in range(11)]
        assert len(client.recommend("new-user", k=3, recent_item_ids=ids[:10]).items) == 3
        code = status_of(lambda: client.recommend("new-user", k=3, recent_item_ids=ids))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code = status_of(lambda: client.similar_items(ids, k=3))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_streams_per_connection_are_capped(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path
) -> None:
    from protos.affinity.v1 import recommender_pb2 as pb
    from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
    from service.loader import LoadedModel
    from tests.service.conftest import GatedPipeline

    gated = GatedPipeline.from_bundle(pipeline.bundle)
    holder = ModelHolder()
    holder.swap(LoadedModel(gated, loaded_model(pipeline).meta))
    settings = settings_for(artifact_dir, tmp_path, max_concurrent_streams=1)
    # A private subchannel pool gives each channel its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with (
        running(settings, holder) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as one,
        grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as other,
    ):
        stub = pb_grpc.RecommenderStub(one)
        request = pb.RecommendRequest(user_id="u01", k=3)
        first = stub.Recommend.future(request, timeout=10)
        assert gated.entered.acquire(timeout=5)
        second = stub.Recommend.future(request, timeout=10)
        # The connection's only stream is taken: the second call waits, unseen by the server.
        assert not gated.entered.acquire(timeout=0.5)
        # Another connection is not affected.
        popular = pb_grpc.RecommenderStub(other).Popular(pb.PopularRequest(k=2), timeout=5)
        assert len(popular.items) == 2
        gated.gate.set()
        assert len(first.result(timeout=10).items) == 3
        assert len(second.result(timeout=10).items) == 3


@pytest.mark.parametrize(
    ("field", "env", "value"),
    [
        ("max_message_bytes", "AFFINITY_MAX_MESSAGE_BYTES", "10"),
        ("max_concurrent_streams", "AFFINITY_MAX_CONCURRENT_STREAMS", "0"),
    ],
)
def test_limit_settings_come_from_the_environment_and_are_validated(
    artifact_dir: Path, monkeypatch: pytest.MonkeyPatch, field: str, env: str, value: str
) -> None:
    from models.errors import InvalidInputError
    from service.config import load_settings

    monkeypatch.setenv(env, "5000")
    assert getattr(load_settings(model_uri=str(artifact_dir)), field) == 5000
    monkeypatch.setenv(env, value)
    with pytest.raises(InvalidInputError, match=env):
        load_settings(model_uri=str(artifact_dir))
