"""The application factory and the AsyncAPI document."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from email_sender.app import create_app, renderer_for, specification
from email_sender.backends import FileBackend, SmtpBackend, make_backend
from email_sender.settings import EmailBackendKind, Settings


def test_specification_documents_the_queue_and_both_reports_without_side_effects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    document = specification(Settings()).to_specification().to_jsonable()

    assert document["info"]["title"] == "email-sender"
    assert set(document["channels"]) == {
        "email_notifications:consume",
        "email_notifications_urgent:consume",
        "notification.email.delivered:publish",
        "notification.email.failed:publish",
        "email.bounced:publish",
        "email_verifications:consume",
    }
    consume = document["operations"]["email_notifications:consume"]
    assert consume["bindings"]["amqp"]["cc"] == ["notification.email.send"]
    urgent = document["operations"]["email_notifications_urgent:consume"]
    assert urgent["bindings"]["amqp"]["cc"] == ["notification.email.send.urgent"]
    for key in ("delivered", "failed"):
        publish = document["operations"][f"notification.email.{key}:publish"]
        assert publish["bindings"]["amqp"]["deliveryMode"] == 2  # persistent
    assert list(tmp_path.iterdir()) == []  # no database, no folder


def test_create_app_connects_to_nothing_until_started(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite"))
    assert app.broker is not None
    assert not (tmp_path / "db.sqlite").exists()


def test_the_backend_follows_email_backend(tmp_path: Path) -> None:
    file_backend = make_backend(Settings(email_file_dir=tmp_path))
    assert isinstance(file_backend, FileBackend)
    assert file_backend.directory == tmp_path
    assert isinstance(make_backend(Settings(email_backend=EmailBackendKind.SMTP)), SmtpBackend)


def test_the_renderer_links_rooms_as_room_url_template_says() -> None:
    room_id = uuid.uuid4()
    template = "https://chat.example.test/rooms/{room_id}"

    assert renderer_for(Settings()).room_url(room_id) is None
    assert (
        renderer_for(Settings(room_url_template=template)).room_url(room_id)
        == f"https://chat.example.test/rooms/{room_id}"
    )
