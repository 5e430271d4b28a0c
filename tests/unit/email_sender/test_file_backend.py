"""The file backend: one complete .eml per notification, written atomically."""

from __future__ import annotations

import uuid
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from email_sender.backends import FileBackend
from email_sender.rendering import EmailRenderer
from herald_shared.retry import RetryableError
from tests.unit.email_sender import support
from tests.unit.email_sender.support import DOMAIN, email_job


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def renderer() -> EmailRenderer:
    return support.renderer()


async def test_writes_one_eml_named_after_the_notification(
    tmp_path: Path, renderer: EmailRenderer
) -> None:
    folder = tmp_path / "out" / "emails"  # created on first use
    job = email_job()

    await FileBackend(folder).send(renderer.render(job), notification_id=job.notification_id)

    (name,) = _names(folder)
    written = folder / name
    assert written.name == f"{job.notification_id}.eml"
    parsed = BytesParser(policy=policy.default).parsebytes(written.read_bytes())
    assert parsed["Message-ID"] == f"<{job.notification_id}@{DOMAIN}>"
    assert parsed["To"] == "Bob <bob@example.test>"
    assert parsed.get_content_type() == "multipart/alternative"


async def test_a_second_delivery_replaces_the_file_and_leaves_no_temporary_file(
    tmp_path: Path, renderer: EmailRenderer
) -> None:
    backend = FileBackend(tmp_path)
    job = email_job()
    other = email_job(notification_id=uuid.uuid4())

    await backend.send(renderer.render(job), notification_id=job.notification_id)
    await backend.send(
        renderer.render(email_job(message_content="again")), notification_id=job.notification_id
    )
    await backend.send(renderer.render(other), notification_id=other.notification_id)

    assert _names(tmp_path) == sorted(
        [f"{job.notification_id}.eml", f"{other.notification_id}.eml"]
    )
    assert b"again" in backend.path_for(job.notification_id).read_bytes()


async def test_an_unwritable_folder_is_retryable(tmp_path: Path, renderer: EmailRenderer) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    job = email_job()

    with pytest.raises(RetryableError) as raised:
        await FileBackend(blocker / "emails").send(
            renderer.render(job), notification_id=job.notification_id
        )

    assert raised.value.reason.startswith("cannot write e-mail file")
