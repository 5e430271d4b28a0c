"""amqps:// URLs: the broker connects with a verifying TLS context built from RABBITMQ_CA_FILE
(and a client certificate when given). No TLS listener runs on these machines, so this checks
what make_broker hands to aio-pika, not a live handshake."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from herald_shared.broker import RabbitSettings, make_broker, tls_context


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key (openssl), usable as CA and as client cert."""
    cert, key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=herald-test-ca", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def _connection_kwargs(settings: RabbitSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = make_broker(settings, service_name="tls-test")._connection_kwargs
    return kwargs


def test_plain_amqp_has_no_tls() -> None:
    settings = RabbitSettings(url="amqp://u:p@rabbitmq:5672/herald")
    assert tls_context(settings) is None
    assert _connection_kwargs(settings).get("ssl_context") is None


def test_amqps_verifies_the_server_against_the_configured_ca(
    certificate: tuple[Path, Path],
) -> None:
    cert, _ = certificate
    settings = RabbitSettings(url="amqps://u:p@rabbitmq/herald", ca_file=cert)
    kwargs = _connection_kwargs(settings)
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert [entry["subject"] for entry in context.get_ca_certs()] == [
        ((("commonName", "herald-test-ca"),),)
    ]
    assert str(kwargs["url"]).startswith("amqps://u:p@rabbitmq:5671/herald")


def test_amqps_loads_a_client_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    settings = RabbitSettings(
        url="amqps://u:p@rabbitmq/herald", ca_file=cert, cert_file=cert, key_file=key
    )
    assert isinstance(tls_context(settings), ssl.SSLContext)
    with pytest.raises(ssl.SSLError):
        tls_context(settings.model_copy(update={"key_file": cert}))  # a cert is no key


def test_settings_read_the_tls_variables(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    monkeypatch.setenv("RABBITMQ_URL", "amqps://u:p@rabbitmq/herald")
    monkeypatch.setenv("RABBITMQ_CA_FILE", str(cert))
    monkeypatch.setenv("RABBITMQ_CERT_FILE", str(cert))
    monkeypatch.setenv("RABBITMQ_KEY_FILE", str(key))
    monkeypatch.setenv("RABBITMQ_DECLARE", "passive")
    settings = RabbitSettings()
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (cert, cert, key)
    assert settings.declare == "passive"
    assert make_broker(settings, service_name="tls-test").declares_passively is True
