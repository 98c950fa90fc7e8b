"""Cross-origin access for browser apps on the device (a kiosk UI, a local dashboard page), for listed origins only.

An ASGI middleware in front of the whole app, so that preflights are answered before the API key is asked for
(browsers never send credentials with a preflight) and every answer to a listed origin, errors and event streams
included, carries `Access-Control-Allow-Origin`. With no origins listed it is not installed at all.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable

from edge.protocol import APIError

METHODS = "GET, POST, OPTIONS"
HEADERS = "Authorization, Content-Type"
MAX_AGE = "600"  # seconds a browser may reuse a preflight answer
# An origin as browsers send it: scheme://host[:port], nothing after; or "null" (file:// pages, sandboxed frames).
ORIGIN = re.compile(r"^(null|[a-z][a-z0-9+.-]*://[^/?#\s]+)$")


def check_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """The origins as given, refusing ones no browser sends (a path or a trailing slash would never match)."""
    origins = tuple(origins)
    bad = [o for o in origins if o != "*" and not ORIGIN.match(o)]
    if bad:
        raise ValueError(f"CORS origin(s) {', '.join(map(repr, bad))} are not origins: give scheme://host[:port] "
                         f"with no path or trailing slash (e.g. http://localhost:3000), 'null', or '*'")
    return origins


class CORS:
    def __init__(self, app, origins: Iterable[str]):
        self.app = app
        self.origins = frozenset(check_origins(origins))
        self.any = "*" in self.origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if origin is None:  # not a cross-origin request from a browser
            return await self.app(scope, receive, send)
        allowed = self.any or origin in self.origins
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self.preflight(origin, allowed, send)
        await self.app(scope, receive, self.stamp(origin, allowed, send))

    def grant(self, origin: str, allowed: bool) -> list[tuple[bytes, bytes]]:
        """The headers that let this origin read the answer (none for an unlisted one), and Vary for caches."""
        headers = [] if self.any else [(b"vary", b"Origin")]
        if allowed:
            headers += [(b"access-control-allow-origin", b"*" if self.any else origin.encode("latin-1")),
                        (b"access-control-expose-headers", b"Retry-After")]  # a page can back off on 429
        return headers

    async def preflight(self, origin: str, allowed: bool, send) -> None:
        if allowed:
            status, body = 204, b""
            headers = [(b"access-control-allow-methods", METHODS.encode()),
                       (b"access-control-allow-headers", HEADERS.encode()),
                       (b"access-control-max-age", MAX_AGE.encode())]
        else:
            status, headers = 403, [(b"content-type", b"application/json")]
            refusal = APIError(403, f"origin {origin!r} is not allowed (edge serve --cors-origin)")
            body = json.dumps(refusal.body()).encode()
        headers += self.grant(origin, allowed) + ([(b"content-length", str(len(body)).encode())] if body else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def stamp(self, origin: str, allowed: bool, send):
        extra = self.grant(origin, allowed)

        async def stamped(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        return stamped
