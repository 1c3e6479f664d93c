"""The server's front door: which requests reach an endpoint at all.

Owns four checks, in this order, each answered in OpenAI's error shape:

- Host (400): the Host header must name this server (`allowed_hosts`); a page on a domain that an
  attacker re-binds to 127.0.0.1 (DNS rebinding) sends its own name and is refused;
- Origin (403): a browser request from another site (an Origin header that is neither this
  server's own address nor one of `allowed_origins`) is refused;
- API key (401): with a key set, every request but GET /health must carry
  `Authorization: Bearer <key>`, compared in constant time;
- content type (415): a POST must be `application/json`, which a cross-site HTML form cannot send
  and a cross-site script can only send after a CORS preflight this server does not grant.

Does not parse bodies or know endpoints beyond /health (server.py).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_hosts(bind: str) -> list[str]:
    """Host names accepted when none are configured: the loopback names on a loopback address;
    any on a public one (its names are not known here; set server.allowed_hosts)."""
    return list(LOOPBACK_NAMES) if is_loopback(bind) else ["*"]


def host_name(value: str) -> str:
    """The host of a Host header or an origin's netloc, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _error(status: int, message: str, code: str) -> JSONResponse:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status)


class Guard:
    """ASGI middleware applying the checks above before the app sees a request."""

    def __init__(self, app, api_key: str | None, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.hosts = {host_name(h) for h in allowed_hosts} or set(LOOPBACK_NAMES)
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def _refusal(self, scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return _error(400, f"invalid Host header {host!r}: this server answers to {sorted(self.hosts)}", "bad_host")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.origins:
            same_site = urlsplit(origin).netloc.lower() == host.lower()
            if not same_site:
                message = f"cross-origin request from {origin!r} refused (see server.allowed_origins)"
                return _error(403, message, "bad_origin")
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                message = f"content type must be application/json, got {media or 'none'!r}"
                return _error(415, message, "bad_content_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)
