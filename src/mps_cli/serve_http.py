"""The HTTP edge of ``mps serve``, below the routes: JSON answers and error bodies, and the guard every
request passes before a route sees it (the token, the body limit, the read deadline, in the ASGI middleware
and in the uvicorn protocol under it), so that a slow or hostile client costs a connection, never a worker."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSON

from .constants import SERVE_READ_TIMEOUT_S

# One logger for the whole server: `mps serve` configures this name.
log = logging.getLogger("mps_cli.server")


class JSONResponse(_StarletteJSON):
    """JSON as UTF-8, except that a text holding a lone surrogate (a file name's undecodable byte, as
    Python spells it) is sent escaped, ``\\udcff``, rather than failing the response."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")



class _BodyTooLarge(Exception):
    pass


class _SlowBody(Exception):
    pass



def _error(status: int, message: str, extra: dict | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, **(extra or {})}, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: the bearer token, the body limit and deadline, and one log line per request."""

    def __init__(self, app, token: str | None, max_body: int, read_timeout: float = SERVE_READ_TIMEOUT_S):
        self.app, self.token, self.max_body, self.read_timeout = app, token, max_body, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 0}
        scope.setdefault("state", {})

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        deadline = time.monotonic() + self.read_timeout
        body_done = False

        async def timed_receive():
            """The next message; while the body is still coming, only until the deadline."""
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _SlowBody() from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                try:
                    await self._drain(timed_receive, 0)
                except _SlowBody:
                    pass  # answered anyway; the connection closes with it
                await refusal(scope, receive, logged_send)
                return
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await timed_receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        if message.get("more_body", False):
                            try:
                                await self._drain(timed_receive, seen)
                            except _SlowBody:
                                pass
                        raise _BodyTooLarge()
                return message

            await self.app(scope, limited_receive, logged_send)
        finally:
            images = scope["state"].get("images")
            log.info("%s %s %d%s %.1f ms", scope["method"], scope["path"], status["code"],
                     f" {images} image{'s' if images != 1 else ''}" if images else "",
                     (time.perf_counter() - start) * 1000.0)

    async def _drain(self, receive, seen: int) -> None:
        """Read and drop the rest of a refused body (up to a bound), so the client gets to read the answer
        instead of a connection reset while it is still sending."""
        cap = max(4 * self.max_body, 64 * 2**20)
        while seen <= cap:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _refuse(self, scope):
        if self.token is not None and scope["path"] != "/healthz":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                what = "missing" if not auth else "wrong"
                return _error(401, f"{what} token: send 'Authorization: Bearer TOKEN'",
                              headers={"WWW-Authenticate": "Bearer"})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return _error(400, "invalid Content-Length")
            if too_big:
                return _error(413, f"request body of {int(length)} bytes is over the {self.max_body} byte limit")
        return None


def _short_text(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _bounded_protocol(read_timeout: float):
    """uvicorn's HTTP protocol (httptools' when installed, as uvicorn picks), with a deadline on each
    request's headers: a connection that has not sent them ``read_timeout`` seconds after it opened
    (or after its first byte, on a kept-alive connection) is answered 408 and closed. uvicorn has
    no such limit, so a client trickling a byte at a time would hold its connection for ever; the
    body's deadline is the middleware's."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    refusal = json.dumps({"error": f"request headers not received within {read_timeout:g} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              + f"content-length: {len(refusal)}\r\n\r\n".encode() + refusal)

    class Bounded(base):
        _timer = None
        _timed_cycle = None  # the request cycle current when the timer was armed: a new one means headers came

        def _arm(self) -> None:
            self._timed_cycle = self.cycle
            self._timer = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                log.info("closed a connection that sent no complete request headers in %g s", read_timeout)
                self.transport.write(answer)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self._timer is not None and self.cycle is not self._timed_cycle:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Bounded


