"""What a recall names, cut to fit a provider's payload limit.

A recall (`PushRequested.recall`) takes notifications off a device: those of its rooms and those
it names by id. Every provider puts the ids in its payload, so their number is bounded by the
provider's limit; `herald_shared.events` bounds them so that the largest recall fits every
provider, and this is the backstop should a payload still be too large (a provider's overhead
grown, the bounds raised): it gives up what matters least first.
"""

from __future__ import annotations

from collections.abc import Callable

from herald_shared.events import PushRecall

# Whether a payload naming these rooms and these notifications fits the provider's limit.
Fits = Callable[[list[str], list[str]], bool]


def fit_recall(recall: PushRecall, fits: Fits) -> tuple[list[str], list[str]]:
    """The recall's room ids and notification ids, as strings in their order, as many as `fits`.

    Notification ids give way first, since a room's id alone takes that room's notifications off
    a device that keeps them by room (Android, and iOS by thread), and from the end of the list,
    which names the newest first (`PushRecall` keeps the newest); then rooms, from the end. One
    room always stays: a recall of nothing would be no recall, and one id fits every provider
    many times over.
    """
    rooms = [str(room_id) for room_id in recall.room_ids]
    ids = [str(notification_id) for notification_id in recall.notification_ids]
    while not fits(rooms, ids):
        if ids:
            ids.pop()
        elif len(rooms) > 1:
            rooms.pop()
        else:
            break
    return rooms, ids
