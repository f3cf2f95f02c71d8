"""The door of the server, before any route runs: access token, request size, queries in flight.

A pure ASGI middleware: a request without the token is answered 401 before its body is read; a body is
refused by its Content-Length when that is over the limit, and otherwise counted while it streams in
(into a spooled file: memory up to 1 MB, then disk) and refused the moment it passes the limit; only a
whole, accepted body is handed to the route, and a body that trickles in for longer than a minute is
refused (408), so slow clients cannot hold the query slots. Queries hold a slot from their first byte
to their answer; when every slot is taken the next one gets 503 at once instead of a growing queue.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from retrieval.server.auth import bearer_ok

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = {"/health"}  # answered without the token (says only the index generation served)
SLOTTED_PATHS = {"/query", "/query-by-reference"}  # each runs the encoder: bounded in number, together
CHUNK = 64 * 1024


async def send_error(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(
        self, app: ASGIApp, token: str | None, max_body: int, max_concurrent: int, body_timeout: float = 60.0
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.token = token
        self.max_body = max_body
        self.slots = asyncio.Semaphore(max_concurrent)
        self.max_concurrent = max_concurrent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.token and scope["path"] not in OPEN_PATHS and not bearer_ok(headers.get(b"authorization"), self.token):
            await send_error(send, 401, "missing or wrong access token", [(b"www-authenticate", b"Bearer")])
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_error(send, 400, "Content-Length is not a number")
                return
            if size > self.max_body:
                await send_error(send, 413, self._too_big())
                return
        if scope["path"] not in SLOTTED_PATHS:
            await self._forward(scope, receive, send)
            return
        if self.slots.locked():
            detail = f"busy: {self.max_concurrent} queries in flight; try again shortly"
            await send_error(send, 503, detail, [(b"retry-after", b"1")])
            return
        async with self.slots:
            await self._forward(scope, receive, send)

    def _too_big(self) -> str:
        return f"request body over the limit of {self.max_body / 2**20:.0f} MB"

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body (bounded in size and time), then run the app on it."""
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as buf:
            try:
                total = await asyncio.wait_for(self._read_body(receive, buf), self.body_timeout)
            except asyncio.TimeoutError:
                await send_error(send, 408, f"request body not received within {self.body_timeout:.0f} s")
                return
            if total is None:  # the client went away
                return
            if total > self.max_body:
                await send_error(send, 413, self._too_big())
                return
            buf.seek(0)
            done = False

            async def replay() -> Message:
                nonlocal done
                if done:
                    return await receive()  # after the body: wait for the client to go away
                data = buf.read(CHUNK)
                done = buf.tell() >= total
                return {"type": "http.request", "body": data, "more_body": not done}

            await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive, buf: Any) -> int | None:
        """Body bytes into buf; stops counting as soon as the limit is passed. None: the client left."""
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                return total
            buf.write(chunk)
            if not message.get("more_body", False):
                return total
