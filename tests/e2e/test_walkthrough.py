"""The README's walk-through, pasted twice into one bash against the four services running with
the zero-setup defaults (SQLite, pushes to a JSON-lines file, e-mails to `.eml` files): both runs
succeed, and each shows its own message's two pushes and two e-mails (Bob and Carol having
confirmed their addresses through the links mailed to them)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from tests.support.processes import SERVICES, running_services

README = Path(__file__).resolve().parents[2] / "README.md"
API_LINE = "B=http://127.0.0.1:8000"
RUN_SEPARATOR = "=== the walk-through again ==="
TEXT = "Hello @room! 👋"


def walkthrough() -> str:
    """The one shell block of the README's "Walk-through" section."""
    section = README.read_text().split("\n## Walk-through\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "the walk-through has one shell block"
    block: str = blocks[0]
    # Every call goes through $B, so pointing $B at the test's message-service is enough.
    assert block.count(API_LINE) == 1, block
    assert block.count(":8000") == 1, block
    return block


def environments(rabbit_url: str, state: Path) -> dict[str, dict[str, str]]:
    """The zero-setup defaults, with every local file under `state` (what ./scripts/start puts
    under ./.herald/) and a RabbitMQ vhost of the test's own."""
    secret = secrets.token_urlsafe(32)
    extra = {
        "message-service": {"UNSUBSCRIBE_SECRET": secret},
        "push-sender": {"PUSH_PROVIDER": "log", "PUSH_LOG_FILE": str(state / "pushes.jsonl")},
        "email-sender": {
            "EMAIL_BACKEND": "file",
            "EMAIL_FILE_DIR": str(state / "emails"),
            "UNSUBSCRIBE_SECRET": secret,
        },
    }
    return {
        name: {
            "RABBITMQ_URL": rabbit_url,
            "DATABASE_URL": f"sqlite+aiosqlite:///{state / f'{name}.db'}",
            **extra.get(name, {}),
        }
        for name in SERVICES
    }


@dataclass(frozen=True)
class Run:
    """What one pasting of the walk-through printed."""

    devices: list[dict[str, Any]]
    pushes: list[dict[str, Any]]
    emails: list[Path]

    @classmethod
    def parse(cls, output: str, cwd: Path) -> Run:
        devices: list[dict[str, Any]] = []
        pushes: list[dict[str, Any]] = []
        emails: list[Path] = []
        for line in filter(None, output.splitlines()):
            if line.endswith(".eml"):
                emails.append(cwd / line)
                continue
            document = json.loads(line)  # anything else printed is a JSON answer or a push
            (pushes if "collapse_id" in document else devices).append(document)
        return cls(devices, pushes, emails)


def _read(path: Path) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def check_run(run: Run) -> tuple[str, str]:
    """Bob's and Carol's phones were registered, and this run's message reached both by push and
    by e-mail; returns the run's suffix and message id."""
    assert [device["platform"] for device in run.devices] == ["fcm", "fcm"], run.devices

    assert len(run.emails) == 2, run.emails
    suffixes, names = set(), set()
    for path in run.emails:
        message = _read(path)
        to = message["To"].addresses[0]
        match = re.fullmatch(r"(bob|carol)_([0-9a-f]{6})@example\.com", to.addr_spec)
        assert match is not None, to.addr_spec
        names.add((match[1], to.display_name))
        suffixes.add(match[2])
        text_part = message.get_body(preferencelist=("plain",))
        assert text_part is not None
        assert "Hello @room!" in text_part.get_content()
    assert names == {("bob", "Bob"), ("carol", "Carol")}
    assert len(suffixes) == 1, suffixes
    suffix = suffixes.pop()

    assert len(run.pushes) == 2, run.pushes
    message_ids = {push["message_id"] for push in run.pushes}
    assert len(message_ids) == 1, message_ids
    assert len({push["recipient_id"] for push in run.pushes}) == 2, run.pushes
    for push in run.pushes:
        assert (push["platform"], push["title"], push["body"]) == ("fcm", "Alice in general", TEXT)
        # The log keeps a device token's last six characters: "phone-<username>" ends in the
        # run's suffix.
        assert push["token"] == f"…{suffix}", push["token"]
    return suffix, message_ids.pop()


async def test_the_readme_walkthrough_works_when_pasted_twice(
    rabbit_url: str, tmp_path: Path
) -> None:
    block = walkthrough()
    cwd = tmp_path / "clone"
    state = cwd / ".herald"
    state.mkdir(parents=True)
    logs = tmp_path / "logs"
    logs.mkdir()

    async with running_services(environments(rabbit_url, state), logs) as services:
        pasted = block.replace(API_LINE, f"B={services['message-service'].base_url}")
        script = f"{pasted}\necho '{RUN_SEPARATOR}'\n{pasted}"
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", script],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no traceback, no curl or grep error
    first, second = (Run.parse(output, cwd) for output in done.stdout.split(f"{RUN_SEPARATOR}\n"))
    first_suffix, first_message = check_run(first)
    second_suffix, second_message = check_run(second)
    assert first_suffix != second_suffix
    assert first_message != second_message
    # Nothing but the two runs' notifications: four pushes and four e-mails of the messages,
    # and Bob's and Carol's invitations (sent first, on the urgent lane: at most four of each).
    pushes = [json.loads(line) for line in (state / "pushes.jsonl").read_text().splitlines()]
    invitation_pushes = [
        push for push in pushes if push["message_id"] not in {first_message, second_message}
    ]
    assert len(pushes) - len(invitation_pushes) == 4
    assert len(invitation_pushes) <= 4
    assert {push["body"] for push in invitation_pushes} <= {"Alice invited you to #general"}
    emails = set(state.joinpath("emails").glob("*.eml"))
    # Every new address was mailed its verification link, once a run (Bob and Carol used theirs).
    verifications = {path for path in emails if str(_read(path)["Subject"]).startswith("Confirm")}
    assert sorted(_read(path)["To"].addresses[0].username[:-7] for path in verifications) == [
        "alice",
        "alice",
        "bob",
        "bob",
        "carol",
        "carol",
    ]
    invitation_emails = emails - verifications - {*first.emails, *second.emails}
    assert len(emails - verifications - invitation_emails) == 4
    assert len(invitation_emails) <= 4
    assert {str(_read(path)["Subject"]) for path in invitation_emails} <= {
        "Alice invited you to #general"
    }
