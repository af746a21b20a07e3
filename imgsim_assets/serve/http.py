"""What every handler shares: refusals as JSON, parameters, where a client is."""

from __future__ import annotations

import ipaddress

from starlette.requests import Request
from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine's loopback."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Unguarded(ValueError):
    """A service that would answer beyond loopback without a token."""


class ApiError(Exception):
    """A request the API refuses: an HTTP status, a machine-readable code and a sentence."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.error, "detail": e.detail}, status_code=e.status, headers=e.headers)


def _int_param(request: Request, name: str, default, low: int, high: int):
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "bad_parameter", f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(422, "bad_parameter", f"{name} must be between {low} and {high}, got {value}")
    return value


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ApiError(422, "bad_parameter", f"{name} must be a number, got {raw!r}") from None
