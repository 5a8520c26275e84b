"""Standard Webhooks signing: the HMAC key a `WEBHOOK_SECRET` carries, and a delivery's signature. A leaf: settings
checks the secret with it at startup, the deliverer (webhooks.py) signs with it, and it imports nothing of the
gateway's."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret, `whsec_` + base64 (the prefix optional)."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("WEBHOOK_SECRET must be 'whsec_' followed by base64") from exc
    if len(key) < 16:
        raise ValueError("WEBHOOK_SECRET must carry at least 16 bytes of key")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`'s value: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
