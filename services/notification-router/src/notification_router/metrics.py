"""notification-router's own Prometheus series (FastStream's middleware adds the per-message ones
to the same registry)."""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from herald_shared.events import Channel, Notifiable, Trigger
from notification_router.routing import PENDING, WAITING, RecipientDecision

WINDOW_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 500)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "herald_router_notifications_decided",
            "Routing decisions, one per recipient and channel: outcome sent (jobs handed to "
            "the sender) or skipped, with the skip reason, and the trigger (dm, mention, "
            "room_mention or message).",
            ["channel", "outcome", "reason", "trigger"],
            registry=registry,
        )
        self.jobs_published = Counter(
            "herald_router_jobs_published",
            "Jobs published (one per push device or e-mail, counted inside their batches; "
            "republished ones included).",
            ["channel"],
            registry=registry,
        )
        self.decision_latency = Histogram(
            "herald_router_decision_latency_seconds",
            "End-to-end latency from MessageCreated.timestamp to the routing decision, per "
            "recipient decided.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.recipient_updates = Counter(
            "herald_router_recipient_updates",
            "UserUpdated snapshots received: applied, or stale (an equal or newer version was "
            "already stored).",
            ["result"],
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "herald_end_to_end_latency_seconds",
            "From MessageCreated.timestamp (message-service's clock) to the moment the sender "
            "saw the provider accept the notification (the delivered report's occurred_at), per "
            "notification, once: observed when the ledger applies the first delivered report. "
            "lane: urgent (DMs and personal mentions) or normal.",
            ["channel", "lane"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivery_reports = Counter(
            "herald_router_delivery_reports",
            "Delivery reports received, by what they did to the ledger: applied, "
            "applied_after_waiting (a digest, or a push held for quiet hours: not in the "
            "end-to-end latency), applied_recall (a recall), stale, unknown.",
            ["channel", "outcome", "result"],
            registry=registry,
        )

        self.windows = Counter(
            "herald_router_windows",
            "Windows of waiting notifications closed by the dispatcher, per channel (email: "
            "digests; push: what waited for quiet hours or a snooze; recall: recalls of pushes "
            "a read or a deletion made stale, one per device): sent (jobs composed), "
            "cancelled (everything in it was read or is no longer wanted), resent (published "
            "again after a dispatcher stopped between composing and publishing).",
            ["channel", "outcome"],
            registry=registry,
        )
        self.window_size = Histogram(
            "herald_router_window_size",
            "Messages told of per window sent (listed or counted in a digest; summed up in "
            "summary pushes; whose pushes a recall takes back).",
            ["channel"],
            buckets=WINDOW_SIZE_BUCKETS,
            registry=registry,
        )
        self.window_entries_cancelled = Counter(
            "herald_router_window_entries_cancelled",
            "Waiting notifications a window left out, by reason (read, muted, email_disabled, "
            "push_disabled, level_mentions, no_email, no_device).",
            ["channel", "reason"],
            registry=registry,
        )
        self.notifications_waiting = Gauge(
            "herald_router_notifications_waiting",
            "Notifications waiting in windows, as the last dispatcher pass counted them, by why "
            "they wait (channel: email, the user's e-mail delay; push, quiet hours or a snooze; "
            "recall, pushes to take back).",
            ["channel"],
            registry=registry,
        )
        self.window_overdue = Gauge(
            "herald_router_window_overdue_seconds",
            "How long the oldest window past its due time has been waiting for the dispatcher "
            "(0 when none is): above a few seconds, the dispatcher is falling behind.",
            registry=registry,
        )

    def observe_delivery(
        self, channel: Channel, trigger: Trigger, created_at: datetime, delivered_at: datetime
    ) -> None:
        latency = max(0.0, (delivered_at - created_at).total_seconds())
        lane = "urgent" if trigger.urgent else "normal"
        self.end_to_end_latency.labels(channel=channel, lane=lane).observe(latency)

    def observe_decisions(
        self,
        event: Notifiable,
        decisions: Iterable[RecipientDecision],
        new_recipient_ids: AbstractSet[uuid.UUID],
        *,
        now: datetime,
    ) -> None:
        """Count each recipient once: the first time it is decided, not on redeliveries. The
        counts are added up per label set first: a message's recipients mostly share one."""
        latency = max(0.0, (now - event.timestamp).total_seconds())
        counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        for decision in decisions:
            if decision.recipient_id not in new_recipient_ids:
                continue
            self.decision_latency.observe(latency)
            trigger = str(decision.trigger)
            for channel, summary in (
                (str(Channel.PUSH), decision.push),
                (str(Channel.EMAIL), decision.email),
            ):
                if summary == PENDING:
                    counts[(channel, "sent", "", trigger)] += 1
                elif summary == WAITING:
                    counts[(channel, "waiting", "", trigger)] += 1
                else:
                    counts[(channel, "skipped", summary.removeprefix("skipped:"), trigger)] += 1
        for (channel_label, outcome, reason, trigger_label), count in counts.items():
            self.decisions.labels(
                channel=channel_label, outcome=outcome, reason=reason, trigger=trigger_label
            ).inc(count)
