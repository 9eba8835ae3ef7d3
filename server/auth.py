"""API keys and the file namespace each one owns; pure functions of the settings, so the ASGI
guard (before any body is read) and the route dependencies decide alike."""

from __future__ import annotations

import hashlib
import secrets

from server.settings import Settings

SHARED_OWNER = "shared"
"""The one file namespace when the server has no per-key namespaces (`api_keys` unset)."""

OWNER_KEY = "stts_owner"
"""`scope["state"][OWNER_KEY]`: the namespace `authenticate` found, for the routes."""


def accepted_keys(settings: Settings) -> list[str]:
    return [*([settings.api_key] if settings.api_key else []), *settings.api_keys]


def key_owner(key: str) -> str:
    """A key's file namespace: a digest, so the key itself is never written to disk."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def authenticate(settings: Settings, authorization: str | None) -> str | None:
    """The caller's file namespace, or None when the key is missing or wrong. Compared as
    bytes in constant time: a non-ASCII header is simply a wrong key."""
    keys = accepted_keys(settings)
    if not keys:
        return SHARED_OWNER
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    given = token.strip().encode("utf-8", "surrogateescape")
    matched = None
    for key in keys:  # every key compared, so timing does not tell which matched
        if secrets.compare_digest(given, key.encode()):
            matched = key
    if matched is None:
        return None
    return key_owner(matched) if settings.api_keys else SHARED_OWNER
