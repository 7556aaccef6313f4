"""Who is calling: named API keys with scopes, and the caller of the RPC being handled.

The interceptor resolves a call's `authorization: Bearer <key>` to a `Caller` and sets it for the
handler (a context variable, so the servicer and what it calls, threads started with `asyncio.to_thread`
included, read it with `current_caller()` and no parameter threading). With no key configured every call
is `LOCAL`: a loopback-only server whose one user may do everything (the bind rule in `shared/serving.py`
keeps such a server off the network).

Keys are compared by SHA-256 (constant time), so a config may hold only the hash; the key itself never
reaches a log or a metric label, its name does. Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from shared.errors import PermissionDenied

INFERENCE, IMAGES, FINETUNE, ADMIN = "inference", "images", "finetune", "admin"
SCOPES = (INFERENCE, IMAGES, FINETUNE, ADMIN)


@dataclass(frozen=True)
class Caller:
    """The key a call was made with: its name (logs, metrics, ownership) and what it may do."""

    name: str
    scopes: frozenset[str]
    requests_per_minute: int | None = None
    max_queued_jobs: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def may(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def require(self, scope: str) -> None:
        if not self.may(scope):
            held = ", ".join(sorted(self.scopes)) or "none"
            raise PermissionDenied(f"the API key {self.name!r} lacks the {scope!r} scope (it has: {held})")

    def require_owner(self, owner: str, what: str) -> None:
        """Changing or deleting something needs the admin scope or the key that created it."""
        if not self.is_admin and owner != self.name:
            raise PermissionDenied(
                f"{what} belongs to another API key; only its owner or a key with the 'admin' scope may change it"
            )

    def sees(self, owner: str) -> bool:
        """Listings show a non-admin key only what it created."""
        return self.is_admin or owner == self.name

    def sees_shared(self, owner: str) -> bool:
        """As `sees`, but what no key owns (the bundled samples, adapters an operator placed) is everyone's."""
        return not owner or self.sees(owner)


# No key configured: the one local user, allowed everything (the server listens on loopback only).
LOCAL = Caller("local", frozenset(SCOPES))

# No default: code that runs outside an RPC (a thread the context did not reach) fails loudly instead of
# acting as LOCAL, which may do everything.
_current: ContextVar[Caller] = ContextVar("modelworks_caller")


def current_caller() -> Caller:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("no caller is set: current_caller() runs only inside an RPC, or under calling_as") from None


@contextlib.contextmanager
def calling_as(caller: Caller) -> Iterator[None]:
    """Run the body as `caller` (the interceptor does this around each handler; tests may too)."""
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


def set_caller(caller: Caller) -> None:
    """Set the caller for the rest of the current task (an RPC handler's own task)."""
    _current.set(caller)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The configured keys by digest; `resolve` maps a presented key to its `Caller`."""

    def __init__(self, callers_by_digest: dict[str, Caller]):
        self._by_digest = {bytes.fromhex(d): c for d, c in callers_by_digest.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def resolve(self, key: str) -> Caller | None:
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for digest, caller in self._by_digest.items():  # every digest compared: no early exit to time
            if hmac.compare_digest(presented, digest):
                found = caller
        return found
