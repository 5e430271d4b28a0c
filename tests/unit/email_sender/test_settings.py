"""email-sender's settings: defaults, environment variables, validation, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from email_sender.settings import EmailBackendKind, Settings, SmtpTls


def test_defaults_need_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EMAIL_BACKEND", "SMTP_HOST", "SMTP_PORT", "SMTP_TLS", "DATABASE_URL", "PORT"):
        monkeypatch.delenv(name, raising=False)

    settings = Settings()

    assert settings.port == 8003
    assert settings.database_url == "sqlite+aiosqlite:///.herald/email-sender.db"
    assert settings.email_backend is EmailBackendKind.FILE
    assert settings.email_file_dir == Path(".herald/emails")
    assert settings.email_from == "Herald <notifications@herald.localhost>"
    assert settings.email_message_id_domain == "herald.localhost"
    assert settings.smtp.host == "localhost"
    assert settings.smtp.tls is SmtpTls.NONE
    assert settings.smtp.port == 25
    assert settings.smtp.username is None
    assert settings.smtp.password is None
    assert settings.smtp.timeout == 30.0


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_FILE_DIR", "/srv/herald/mails")
    monkeypatch.setenv("EMAIL_FROM", "Chat <noreply@chat.example>")
    monkeypatch.setenv("EMAIL_MESSAGE_ID_DOMAIN", "Chat.Example")
    monkeypatch.setenv("SMTP_HOST", "smtp.example")
    monkeypatch.setenv("SMTP_TLS", "starttls")
    monkeypatch.setenv("SMTP_USERNAME", "herald")
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret-value")
    monkeypatch.setenv("SMTP_TIMEOUT", "12.5")
    monkeypatch.setenv("PORT", "9003")

    settings = Settings()

    assert settings.port == 9003
    assert settings.email_backend is EmailBackendKind.SMTP
    assert settings.email_file_dir == Path("/srv/herald/mails")
    assert settings.email_from == "Chat <noreply@chat.example>"
    assert settings.email_message_id_domain == "chat.example"
    assert settings.smtp.host == "smtp.example"
    assert settings.smtp.port == 587
    assert settings.smtp.username == "herald"
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "s3cret-value"
    assert settings.smtp.timeout == 12.5
    assert "s3cret-value" not in repr(settings)
    assert "s3cret-value" not in str(settings.model_dump())


@pytest.mark.parametrize(
    "sender",
    ["not an address", "a@b.test, c@d.test", "Herald <notifications@herald.localhost>\r\nBcc: x@y"],
)
def test_email_from_must_be_one_address(sender: str) -> None:
    with pytest.raises(ValidationError):
        Settings(email_from=sender)


@pytest.mark.parametrize("domain", ["", "bad domain", "a..b", "x@y", "-x.test"])
def test_message_id_domain_must_be_a_domain(domain: str) -> None:
    with pytest.raises(ValidationError):
        Settings(email_message_id_domain=domain)


def test_credentials_are_never_sent_in_clear_to_a_remote_host() -> None:
    with pytest.raises(ValidationError, match="need SMTP_TLS"):
        Settings(smtp_host="smtp.example", smtp_username="u", smtp_password="p")
    Settings(smtp_host="127.0.0.1", smtp_username="u", smtp_password="p")
    Settings(smtp_host="smtp.example", smtp_username="u", smtp_password="p", smtp_tls=SmtpTls.TLS)


def test_username_and_password_go_together() -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(smtp_username="u")


@pytest.mark.parametrize(
    "url",
    [
        "https://herald.example.com\r\nBcc: eve@evil.test",
        "https://herald.example.com/a b",
        "javascript:alert(1)",
        "herald.example.com",
        "https://herald.example.com/?x=1",
        "https://herald.example.com/#top",
    ],
)
def test_the_unsubscribe_base_url_must_be_one_plain_http_url(url: str) -> None:
    with pytest.raises(ValidationError, match="EMAIL_UNSUBSCRIBE_BASE_URL"):
        Settings(email_unsubscribe_base_url=url)


def test_unsubscribe_links_point_at_message_service() -> None:
    assert Settings().unsubscribe_url == "http://127.0.0.1:8000/unsubscribe"
    configured = Settings(email_unsubscribe_base_url="https://herald.example.com/api/")
    assert configured.unsubscribe_url == "https://herald.example.com/api/unsubscribe"


def test_a_short_unsubscribe_secret_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(unsubscribe_secret="too-short")


def test_room_links_are_off_unless_a_template_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROOM_URL_TEMPLATE", raising=False)
    assert Settings().room_url_template is None
    monkeypatch.setenv("ROOM_URL_TEMPLATE", "")
    assert Settings().room_url_template is None
    monkeypatch.setenv("ROOM_URL_TEMPLATE", "https://chat.example.com/rooms/{room_id}")
    assert Settings().room_url_template == "https://chat.example.com/rooms/{room_id}"


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:3000/#/room/{room_id}?from=email",
        "https://{room_id}.rooms.example.com/",
        "https://chat.example.com/rooms/{room_id}/again/{room_id}",
    ],
)
def test_a_room_url_template_may_put_the_room_id_anywhere_in_an_http_url(template: str) -> None:
    assert Settings(room_url_template=template).room_url_template == template


@pytest.mark.parametrize(
    "template",
    [
        "https://chat.example.com/rooms/",  # no placeholder
        "https://chat.example.com/rooms/{id}",
        "https://chat.example.com/{room_id}/{user_id}",
        "https://chat.example.com/rooms/{room_id}}",
        "https://chat.example.com/rooms/{{room_id}}",
        "https://chat.example.com/rooms/{room_id!r}",
        "https://chat.example.com/rooms/{ room_id }",
        "javascript:alert('{room_id}')",
        "ftp://chat.example.com/{room_id}",
        "chat.example.com/rooms/{room_id}",
        "https:///rooms/{room_id}",
        "https://[::1/rooms/{room_id}",
        "https://chat.example.com/rooms/{room_id}\r\nBcc: eve@evil.test",
        "https://chat.example.com/my rooms/{room_id}",
        "https://chat.example.com/räume/{room_id}",
    ],
)
def test_a_room_url_template_that_is_not_one_http_url_with_the_room_id_is_refused(
    template: str,
) -> None:
    with pytest.raises(ValidationError, match="ROOM_URL_TEMPLATE"):
        Settings(room_url_template=template)
