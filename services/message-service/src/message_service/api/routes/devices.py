"""The caller's devices: push tokens and browsers' Web Push subscriptions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from herald_shared.events import Platform, WebPushKeys
from message_service import service
from message_service.api.deps import Deps, DeviceOwner, Me, SessionDep
from message_service.api.responses import CONFLICT, INVALID, NOT_FOUND, link
from message_service.api.schemas import DeviceCreate, DeviceOut, WebPushDeviceCreate

router = APIRouter(tags=["devices"])
_DEVICE_LINKS = {
    "DeleteDevice": link("/users/me/devices/{device_id}", "DELETE", device_id="$response.body#/id")
}


@router.get("/users/me/devices")
async def list_devices(me: Me, session: SessionDep) -> list[DeviceOut]:
    devices = await service.list_devices(session=session, user_id=me.id)
    return [DeviceOut.of(device) for device in devices]


@router.post(
    "/users/me/devices",
    status_code=201,
    responses={
        201: {"links": _DEVICE_LINKS},
        200: {"description": "Already registered (refreshed)", "links": _DEVICE_LINKS},
        **CONFLICT,
        **INVALID,
    },
)
async def register_device(
    body: DeviceCreate, me: DeviceOwner, session: SessionDep, deps: Deps, response: Response
) -> DeviceOut:
    """Register a push token, or a browser's Web Push subscription (201), under this session:
    signing it out removes the device. Registering the same one again refreshes it and returns
    the device (200). A token another account registered moves to yours, and that account's
    session on the device is signed out."""
    if isinstance(body, WebPushDeviceCreate):
        service.check_web_push_endpoint(body.endpoint, allowed_hosts=deps.webpush_allowed_hosts)
        token = body.endpoint
        keys: WebPushKeys | None = WebPushKeys(p256dh=body.keys.p256dh, auth=body.keys.auth)
    else:
        token, keys = body.token, None
    registration = await service.register_device(
        session=session,
        user_id=me.id,
        session_id=me.session_id,
        platform=Platform(body.platform),
        token=token,
        web_push_keys=keys,
        max_devices=deps.max_devices_per_user,
    )
    if registration.moved_from is not None:
        deps.metrics.device_moves.inc()
    if not registration.created:
        response.status_code = status.HTTP_200_OK
    return DeviceOut.of(registration.device)


@router.delete("/users/me/devices/{device_id}", status_code=204, responses=NOT_FOUND)
async def delete_device(device_id: uuid.UUID, me: Me, session: SessionDep) -> None:
    await service.remove_device(session=session, user_id=me.id, device_id=device_id)
