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

from models.engine import Engine
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
    engine: Engine, artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, bytes]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(tmp)
    holder = ModelHolder()
    holder.swap(loaded_model(engine))
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
    engine: Engine, artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ModelHolder()
    holder.swap(loaded_model(engine))
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
