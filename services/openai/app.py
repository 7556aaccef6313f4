"""The FastAPI app: the routes, the errors in OpenAI's envelope, request-size limits and metrics."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.openai import embeddings, files, fine_tuning, images, metrics, model_routes, text_routes
from services.openai.auth import caller_metadata
from services.openai.catalog import ModelCatalog
from services.openai.clients import ServiceClients
from services.openai.context import METADATA, Context
from services.openai.errors import APIError, install_handlers
from services.openai.image_store import ImageStore
from shared.auth import KeyRing
from shared.settings import OpenAISettings


class BodyLimit:
    """Refuses a request body past its limit with 413: at once from Content-Length, else as it streams in.

    File uploads (`POST /v1/files`) get `openai.max_upload_bytes`, everything else `openai.max_request_bytes`."""

    def __init__(self, app: ASGIApp, settings: OpenAISettings):
        self.app = app
        self.settings = settings

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if scope["path"] == "/v1/files" and scope["method"] == "POST":
            return self.settings.max_upload_bytes, "openai.max_upload_bytes"
        return self.settings.max_request_bytes, "openai.max_request_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, setting = self._limit(scope)
        message = f"the request body is larger than {limit} bytes ({setting})"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await APIError(413, message, code="too_large").response()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            received = await receive()
            seen += len(received.get("body", b""))
            if seen > limit:  # a chunked body: FastAPI passes an HTTPException raised while it reads through
                raise StarletteHTTPException(413, message)
            return received

        await self.app(scope, counted, send)


class KeyGuard:
    """With keys configured, a `/v1` request without a valid key is a 401 before its body is read or any route
    runs (so no route can forget it); image URLs are exempt, their unguessable token is their key."""

    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/v1/") and not path.startswith("/v1/images/files/"):
            try:
                metadata = caller_metadata(self.keys, Request(scope))
            except APIError as refused:
                return await refused.response()(scope, receive, send)
            scope.setdefault("state", {})[METADATA] = metadata  # what the `Auth` dependency hands the routes
        await self.app(scope, receive, send)


METHODS = frozenset({"GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"})


class Metered:
    """Counts each response by route and status, and times it to its start (a stream's headers go with its
    first chunk). Plain ASGI: a streamed body passes through untouched.

    A request answered before routing (a 401 from `KeyGuard`, a 413) is labelled with the route template it
    would have reached, so refusals show up per route; a path no route matches is `unmatched` (bounded
    label values, never the raw path)."""

    def __init__(self, app: ASGIApp, routes: list[APIRoute]):
        self.app = app
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        """The route's template, as the router would pick it: a full match first, then one of another method."""
        if (matched := scope.get("route")) is not None:
            return matched.path
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path
            if match is Match.PARTIAL and partial is None:
                partial = route.path
        return partial or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = self._route(scope)
                method = scope["method"] if scope["method"] in METHODS else "other"  # bounded label values
                metrics.LATENCY.labels(method, route).observe(time.perf_counter() - start)
                metrics.REQUESTS.labels(method, route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, observed)


def build_app(settings: OpenAISettings, keys: KeyRing) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        clients = ServiceClients(settings)
        app.state.context = Context(
            settings,
            clients,
            ModelCatalog(clients, settings.model_list_ttl_s),
            ImageStore(settings.image_url_ttl_s, settings.image_url_bytes),
        )
        yield
        await clients.close()

    app = FastAPI(
        title="ModelWorks OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    install_handlers(app)
    routers = [module.router for module in (model_routes, text_routes, embeddings, images, files, fine_tuning)]
    for router in routers:
        app.include_router(router)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(KeyGuard, keys=keys)  # before the body is read
    own = [route for route in app.router.routes if isinstance(route, APIRoute)]  # /health
    app.add_middleware(Metered, routes=[*(route for router in routers for route in router.routes), *own])
    return app
