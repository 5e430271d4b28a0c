"""The compose stack as containers, driven through the public API: once with one container per
service, once scaled (two replicas of the router and of each sender, compose's `--scale`)."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from scripts.container_stack import SERVICES, image
from tests.containers.conftest import Stack, podman, running_stack, wait_for

# The image's user (deploy/Dockerfile's useradd --uid).
HERALD_UID = 10001


@pytest.fixture(scope="module", params=[1, 2], ids=["one-replica", "two-replicas"])
def stack(
    request: pytest.FixtureRequest, images: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack"), replicas=request.param) as running:
        yield running


def _register(client: httpx.Client, name: str) -> dict[str, str]:
    """A user `name_<suffix>` with one FCM phone; the answer holds its token."""
    suffix = uuid.uuid4().hex[:6]
    response = client.post(
        "/users",
        json={
            "username": f"{name}_{suffix}",
            "display_name": name.title(),
            "email": f"{name}_{suffix}@example.com",
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 201, response.text
    user: dict[str, str] = response.json()
    device = client.post(
        "/users/me/devices",
        json={"platform": "fcm", "token": f"phone-{name}_{suffix}"},
        headers={"authorization": f"Bearer {user['token']}"},
    )
    assert device.status_code == 201, device.text
    at_once = client.put(
        "/users/me/preferences",
        json={"email_delay": 0},
        headers={"authorization": f"Bearer {user['token']}"},
    )
    assert at_once.status_code == 200, at_once.text
    return user


def _room(client: httpx.Client) -> tuple[dict[str, str], dict[str, str], dict[str, str], str]:
    """The walk-through's room: Alice invites Bob and Carol, both join. (alice, bob, carol, id)"""
    alice, bob, carol = (_register(client, name) for name in ("alice", "bob", "carol"))
    room = client.post(
        "/rooms",
        json={"name": "general", "member_ids": [bob["id"], carol["id"]]},
        headers={"authorization": f"Bearer {alice['token']}"},
    )
    assert room.status_code == 201, room.text
    for member in (bob, carol):
        joined = client.post(
            f"/rooms/{room.json()['id']}/join",
            headers={"authorization": f"Bearer {member['token']}"},
        )
        assert joined.status_code == 200, joined.text
    return alice, bob, carol, room.json()["id"]


def _post(client: httpx.Client, author: dict[str, str], room: str, content: str) -> str:
    posted = client.post(
        f"/rooms/{room}/messages",
        json={"content": content},
        headers={"authorization": f"Bearer {author['token']}"},
    )
    assert posted.status_code == 201, posted.text
    message_id: str = posted.json()["id"]
    return message_id


def _pushes(stack: Stack, phones: set[str]) -> list[tuple[str, str]]:
    """(device token, body) of every push the fake FCM accepted for these phones."""
    return [
        (push["message"]["token"], push["message"]["notification"]["body"])
        for push in list(stack.fcm.accepted)
        if push["message"]["token"] in phones
    ]


def _emails(stack: Stack, addresses: set[str]) -> list[tuple[str, str]]:
    """(recipient address, plain-text body) of every e-mail the fake SMTP server received."""
    found = []
    for mail in list(stack.smtp.received):
        address = mail["To"].addresses[0].addr_spec
        if address in addresses:
            text = mail.get_body(preferencelist=("plain",))
            assert text is not None
            found.append((address, str(text.get_content())))
    return found


def test_every_service_answers_ready(stack: Stack) -> None:
    for service in SERVICES:
        for url in stack.urls(service):
            response = httpx.get(f"{url}/health/ready", timeout=5)
            assert response.status_code == 200, (service, response.text)


def test_every_container_runs_as_non_root_on_a_read_only_root(stack: Stack) -> None:
    containers = stack.containers()
    assert set(containers) == {name for service in SERVICES for name in stack.instances(service)}, (
        containers.keys()
    )
    for name, container in containers.items():
        assert container["State"]["Status"] == "running", name
        assert container["Config"]["User"] == "herald", name
        assert container["HostConfig"]["ReadonlyRootfs"] is True, name
        identity = podman("exec", container["Id"], "id", "-u").stdout.strip()
        assert identity == str(HERALD_UID), name
        # The service's process itself (PID 1 is the service: exec in the image's CMD).
        status = podman("exec", container["Id"], "cat", "/proc/1/status").stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {str(HERALD_UID)}, (name, uids)
        for path in ("/app/written-at-run-time", "/home/herald/written-at-run-time"):
            refused = podman("exec", container["Id"], "touch", path, check=False)
            assert refused.returncode != 0, (name, path)
            assert "Read-only file system" in refused.stderr, (name, refused.stderr)
        scratch = podman("exec", container["Id"], "touch", "/tmp/scratch", check=False)  # noqa: S108
        assert scratch.returncode == 0, (name, scratch.stderr)


def test_compose_variables_reach_the_containers_interpolated(stack: Stack) -> None:
    """compose.yaml's `${...}` arrive substituted: `RABBITMQ_URLS` (the cluster profile's
    addresses, HERALD_CLUSTER unset) empty, as Compose passes it. Only names are reported: the
    values hold passwords and the unsubscribe secret."""
    for name, container in stack.containers().items():
        env = dict(item.partition("=")[::2] for item in container["Config"]["Env"])
        assert sorted(key for key, value in env.items() if "$" in value) == [], name
        assert "RABBITMQ_URLS" in env, name
        assert env["RABBITMQ_URLS"] == "", name


def test_the_walkthrough_message_reaches_a_push_and_an_email(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api, timeout=10) as client:
        alice, bob, carol, room = _room(client)
        text = "Hello @room! 👋"
        _post(client, alice, room, text)
    phones = {f"phone-{user['username']}" for user in (bob, carol)}
    addresses = {f"{user['username']}@example.com" for user in (bob, carol)}

    # Bob and Carol also hear of their invitations ("Alice invited you to #general"): the
    # message's notifications are those that quote it.
    def pushes() -> list[tuple[str, str]]:
        return [push for push in _pushes(stack, phones) if push[1] == text]

    def emails() -> list[tuple[str, str]]:
        return [mail for mail in _emails(stack, addresses) if "Hello @room!" in mail[1]]

    wait_for(lambda: len(pushes()) >= 2, timeout=60)
    wait_for(lambda: len(emails()) >= 2, timeout=60)
    assert sorted(pushes()) == sorted((phone, text) for phone in phones)
    assert sorted(address for address, _ in emails()) == sorted(addresses)


def test_a_compose_restart_of_the_router_loses_nothing(stack: Stack) -> None:
    """Messages posted before, during and after `compose restart` of every router container:
    each reaches both recipients by push and by e-mail, exactly once."""
    with httpx.Client(base_url=stack.api, timeout=10) as client:
        alice, bob, carol, room = _room(client)
        run = uuid.uuid4().hex[:6]
        posted: list[str] = []
        errors: list[BaseException] = []
        restarted = threading.Event()

        def post_until_restarted() -> None:
            try:
                with httpx.Client(base_url=stack.api, timeout=10) as poster:
                    number = 0
                    while not restarted.is_set() or number < 10:
                        content = f"@room restart check {run}-{number:03d}"
                        _post(poster, alice, room, content)
                        posted.append(content)
                        number += 1
                        restarted.wait(0.1)  # paced: a few dozen messages in all
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        poster = threading.Thread(target=post_until_restarted)
        poster.start()
        try:
            wait_for(lambda: len(posted) >= 5, timeout=30)
            stack.compose("restart", *stack.instances("notification-router"))
            wait_for(lambda: stack.ready("notification-router"), timeout=120)
        finally:
            restarted.set()
            poster.join(timeout=60)
        assert errors == []
        last = f"@room restart check {run}-last"
        _post(client, alice, room, last)
        posted.append(last)

    phones = {f"phone-{user['username']}" for user in (bob, carol)}
    addresses = {f"{user['username']}@example.com" for user in (bob, carol)}

    # The messages' notifications (not the invitations'), by recipient and message.
    def pushes() -> Counter[tuple[str, str]]:
        return Counter(push for push in _pushes(stack, phones) if push[1] in posted)

    def emails() -> Counter[tuple[str, str]]:
        return Counter(
            (address, content)
            for address, body in _emails(stack, addresses)
            for content in posted
            if content in body
        )

    wait_for(lambda: pushes().total() >= 2 * len(posted), timeout=120)
    wait_for(lambda: emails().total() >= 2 * len(posted), timeout=120)
    assert pushes() == Counter((phone, content) for phone in phones for content in posted)
    assert emails() == Counter((address, content) for address in addresses for content in posted)


def test_push_sender_image_holds_no_web_framework_orm_or_templates(images: None) -> None:
    probe = (
        "import importlib.util, json; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "['fastapi', 'starlette', 'sqlmodel', 'jinja2', 'push_sender', 'httpx', 'asyncpg']}))"
    )
    done = podman("run", "--rm", "--network=none", image("push-sender"), "python", "-c", probe)
    found: dict[str, Any] = json.loads(done.stdout)
    assert found == {
        "fastapi": False,
        "starlette": False,
        "sqlmodel": False,
        "jinja2": False,
        "push_sender": True,  # the probe can see packages at all
        "httpx": True,
        "asyncpg": True,
    }
    # And no distribution of theirs is installed either (a module could hide under a name).
    names = (
        "import importlib.metadata as m; "
        "print(*(d.metadata['Name'].lower() for d in m.distributions()))"
    )
    listed = podman(
        "run", "--rm", "--network=none", image("push-sender"), "python", "-c", names
    ).stdout.split()
    assert {"fastapi", "starlette", "sqlmodel", "jinja2"} & set(listed) == set()
    assert "push-sender" in listed
