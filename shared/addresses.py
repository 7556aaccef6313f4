"""Network addresses: which ones only this host can reach. Torch-free, for the gateway too."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: an address only this host can reach."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_refusal(address: str, protected: bool, allow_unauthenticated: bool, remedy: str) -> str | None:
    """Why a server must not listen on `address`, or None: beyond loopback, something must guard it.

    `protected` is an API key (or, for the web app, a login); `allow_unauthenticated` is the operator's
    explicit, documented opt-out."""
    if is_loopback(address) or protected or allow_unauthenticated:
        return None
    return (
        f"asked to listen on {address}, which other hosts can reach, with nothing guarding it: {remedy}, or "
        "listen on 127.0.0.1 (MODELWORKS_BIND_ADDRESS); MODELWORKS_ALLOW_UNAUTHENTICATED=true serves it open "
        "to anyone (dangerous)"
    )
