"""`Authorization: Bearer <key>`, checked against the keys of the services' own config, then passed on.

The key is checked here so that a missing or wrong one is a 401 before any service is called; it is then
sent with every gRPC call, so scopes (403), per-key rate limits (429) and ownership are the services' own.
With no key configured the server is the loopback-only local one, and every call is the local user's.
"""

from __future__ import annotations

from fastapi import Request

from services.openai.clients import Metadata
from services.openai.errors import APIError
from shared.auth import KeyRing


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def caller_metadata(keys: KeyRing, request: Request) -> Metadata:
    """The metadata to send the services for this request; 401 when keys are configured and it has none."""
    if not keys.enabled:
        return ()
    key = _bearer(request)
    if key is None:
        raise APIError(
            401,
            "no API key: send `Authorization: Bearer <key>` (the openai SDK's api_key) with a key this "
            "server's operator gave you",
            code="missing_api_key",
        )
    if keys.resolve(key) is None:
        raise APIError(401, "the API key is not valid: check it, or ask the operator for one", code="invalid_api_key")
    return (("authorization", f"Bearer {key}"),)
