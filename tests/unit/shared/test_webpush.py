"""The Web Push endpoint allowlist, as message-service and push-sender both apply it."""

from __future__ import annotations

import pytest

from herald_shared.webpush import DEFAULT_ALLOWED_HOSTS, endpoint_problem

WITH_LOOPBACK = (*DEFAULT_ALLOWED_HOSTS, "127.0.0.1")
NOT_HTTPS = "endpoint must be an https URL"
NOT_PLAIN = "endpoint must be a plain https URL"
NOT_KNOWN = "endpoint is not on a known push service"
CREDENTIALS = "endpoint must not carry credentials"


@pytest.mark.parametrize(
    ("endpoint", "allowed_hosts", "problem"),
    [
        # The real push services, by default.
        ("https://fcm.googleapis.com/fcm/send/abc:APA91b", DEFAULT_ALLOWED_HOSTS, None),
        ("https://android.googleapis.com/gcm/send/abc", DEFAULT_ALLOWED_HOSTS, None),
        ("https://updates.push.services.mozilla.com/wpush/v2/gAAAA", DEFAULT_ALLOWED_HOSTS, None),
        ("https://wns2-by3p.notify.windows.com/w/?token=BQYAAA", DEFAULT_ALLOWED_HOSTS, None),
        ("https://web.push.apple.com/QGuQyavXutnMH", DEFAULT_ALLOWED_HOSTS, None),
        ("https://FCM.googleapis.com:443/fcm/send/x", DEFAULT_ALLOWED_HOSTS, None),
        # A local test push service: plain http to a loopback host, only when allowlisted.
        ("http://127.0.0.1:8080/push/1", WITH_LOOPBACK, None),
        ("http://127.0.0.1:8080/push/1", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("http://localhost:8080/push/1", WITH_LOOPBACK, NOT_KNOWN),
        ("http://[::1]:8080/push/1", (*DEFAULT_ALLOWED_HOSTS, "::1"), None),
        # https only, elsewhere.
        ("http://fcm.googleapis.com/fcm/send/x", DEFAULT_ALLOWED_HOSTS, NOT_HTTPS),
        ("http://169.254.169.254/latest/meta-data/", DEFAULT_ALLOWED_HOSTS, NOT_HTTPS),
        ("ftp://fcm.googleapis.com/x", DEFAULT_ALLOWED_HOSTS, NOT_HTTPS),
        ("https:///fcm/send/x", DEFAULT_ALLOWED_HOSTS, NOT_HTTPS),
        ("fcm.googleapis.com/fcm/send/x", DEFAULT_ALLOWED_HOSTS, NOT_HTTPS),
        # Hosts off the list, including look-alikes and the bare domain of a wildcard.
        ("https://169.254.169.254/latest/meta-data/", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://evil.example/push/1", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://fcm.googleapis.com.evil.example/x", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://evilfcm.googleapis.com/fcm/send/abc", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://notify.windows.com/w/?token=x", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://fcm.googleapis.com./fcm/send/x", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://fcm%2egoogleapis.com/fcm/send/x", DEFAULT_ALLOWED_HOSTS, NOT_KNOWN),
        ("https://fcm.googleapis.com/x", (), NOT_KNOWN),
        # Credentials in the URL.
        ("https://user:pw@fcm.googleapis.com/fcm/send/x", DEFAULT_ALLOWED_HOSTS, CREDENTIALS),
        ("https://user@fcm.googleapis.com/fcm/send/x", DEFAULT_ALLOWED_HOSTS, CREDENTIALS),
        # What another URL parser could read differently: refused before parsing.
        ("https://fcm.googleapis.com\\@evil.example/x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("https://fcm.googleapis.com\t.evil.example/x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("https://fcm.googleapis.com /x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("https://fcm.googleapis.com\u3002evil.example/x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("not a url at all", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("https://fcm.googleapis.com:99999/x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("https://fcm.googleapis.com:port/x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
        ("https://[::1/x", DEFAULT_ALLOWED_HOSTS, NOT_PLAIN),
    ],
)
def test_endpoint_problem(
    endpoint: str, allowed_hosts: tuple[str, ...], problem: str | None
) -> None:
    assert endpoint_problem(endpoint, allowed_hosts) == problem
