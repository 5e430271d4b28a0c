"""The benchmark's replicas and cluster: `--replicas` parsing, process names, each process's
address list, the load's round robin over message-service's replicas, memory per replica."""

from __future__ import annotations

import pytest

from bench.__main__ import parse
from bench.broker import Broker, rotated
from bench.load import api_session
from bench.monitor import Rabbitmqctl, RssAccount
from bench.report import describe_rss
from bench.services import SERVICES, parse_replicas, replica_names

NODES = ("amqp://n1/v", "amqp://n2/v", "amqp://n3/v")


def test_replicas_for_every_service_for_some_or_both() -> None:
    assert parse_replicas("1") == dict.fromkeys(SERVICES, 1)
    assert parse_replicas("2") == dict.fromkeys(SERVICES, 2)
    assert parse_replicas("router=2, push-sender=3") == {
        "message-service": 1,
        "notification-router": 2,
        "push-sender": 3,
        "email-sender": 1,
    }
    assert parse_replicas("2,email-sender=1") == {
        "message-service": 2,
        "notification-router": 2,
        "push-sender": 2,
        "email-sender": 1,
    }


@pytest.mark.parametrize("text", ["", "0", "two", "router=", "=2", "router=0", "mailer=2", "-1"])
def test_replicas_that_make_no_sense_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"want N|is not one of"):
        parse_replicas(text)


def test_the_command_line_takes_replicas_and_cluster() -> None:
    options = parse(["--count", "10", "--replicas", "push-sender=2", "--cluster"])
    assert options.cluster
    assert options.replicas["push-sender"] == 2
    assert options.replicas["message-service"] == 1
    default = parse(["--count", "10"])
    assert (default.cluster, default.replicas) == (False, dict.fromkeys(SERVICES, 1))
    with pytest.raises(SystemExit):
        parse(["--replicas", "router=0"])


def test_the_first_process_of_a_service_has_its_name_the_others_a_number() -> None:
    assert replica_names({"message-service": 2, "push-sender": 3}) == [
        ("message-service", "message-service"),
        ("message-service#2", "message-service"),
        ("notification-router", "notification-router"),
        ("push-sender", "push-sender"),
        ("push-sender#2", "push-sender"),
        ("push-sender#3", "push-sender"),
        ("email-sender", "email-sender"),
    ]


def test_each_process_starts_at_the_next_node_and_keeps_every_node() -> None:
    assert rotated(NODES, 0) == list(NODES)
    assert rotated(NODES, 1) == [NODES[1], NODES[2], NODES[0]]
    assert rotated(NODES, 5) == [NODES[2], NODES[0], NODES[1]]
    assert rotated((), 3) == []
    broker = Broker(url=NODES[0], node_urls=NODES, amqp_ports=(1, 2, 3), ctl=Rabbitmqctl())
    # Two replicas of each of the four services, started in order: neighbours on other nodes.
    processes = replica_names(dict.fromkeys(SERVICES, 2))
    firsts = [broker.first_node(turn) for turn in range(len(processes))]
    assert firsts == [1, 2, 3, 1, 2, 3, 1, 2]
    assert broker.service_url(1) == "amqp://n2/v,amqp://n3/v,amqp://n1/v"
    machine = Broker(url=NODES[0], node_urls=NODES[:1], amqp_ports=(5672,), ctl=Rabbitmqctl())
    assert {machine.service_url(turn) for turn in range(4)} == {NODES[0]}


def test_rabbitmqctl_is_aimed_at_a_node_only_when_one_is_named() -> None:
    assert Rabbitmqctl("ctl").argv("list_queues") == ["ctl", "list_queues"]
    assert Rabbitmqctl("ctl", "n1@localhost").argv("-q", "list_queues") == [
        "ctl",
        "-n",
        "n1@localhost",
        "-q",
        "list_queues",
    ]


async def test_requests_go_to_the_message_service_replicas_in_turn() -> None:
    async with api_session(["http://127.0.0.1:1", "http://127.0.0.1:2/"], 4) as api:
        urls = [api.url("/rooms") for _ in range(4)]
    assert urls == [
        "http://127.0.0.1:1/rooms",
        "http://127.0.0.1:2/rooms",
        "http://127.0.0.1:1/rooms",
        "http://127.0.0.1:2/rooms",
    ]


def test_memory_of_replicas_is_their_sum_and_each_ones_largest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes = {1: 100, 2: 150}
    monkeypatch.setattr("bench.monitor.rss_bytes", lambda pid: sizes.get(pid))
    account = RssAccount()
    account.sample([1, 2, 3])  # 3 is gone
    sizes.update({1: 180, 2: 90})
    account.sample([1, 2])
    assert (account.first, account.max, account.last) == (250, 270, 270)
    assert (account.processes, account.max_per_process) == (2, 180)


def test_the_table_gives_a_group_of_processes_its_largest_one() -> None:
    one = {"first": 60.0, "max": 95.0, "last": 90.0, "processes": 1, "max_per_process": 95.0}
    two = {"first": 120.0, "max": 190.0, "last": 180.0, "processes": 2, "max_per_process": 98.0}
    assert describe_rss("router", one) == "router 60 → 95"
    assert describe_rss("push-sender", two) == "push-sender 120 → 190 (2 processes, largest 98)"
    # documents from before replicas have no count
    assert describe_rss("old", {"first": 1.0, "max": 2.0, "last": 2.0}) == "old 1 → 2"


def test_a_rate_runs_for_the_whole_duration_unless_a_count_is_given() -> None:
    """At 1,000 notifications/s in rooms of 10 (9 recipients), 30 s take 3,334 messages; the
    default count (1,000) would have ended the run after 9 s."""
    assert parse(["--rate", "1000", "--duration", "30"]).count == 3334
    assert parse(["--rate", "1000", "--duration", "30", "--count", "500"]).count == 500
    assert parse(["--duration", "30"]).count == 1000  # at full speed the count governs
    assert parse(["--scenario", "lanes", "--rate", "1000"]).count == 20
