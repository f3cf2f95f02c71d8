"""Who may listen where, and who may ask: the access token (constant-time compare, never logged)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat
from pathlib import Path

from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """True only for addresses that other machines cannot reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a reachable address


def read_token(token_env: str | None, token_file: Path | None) -> str | None:
    """The operator's access token, from the environment variable or the file they named (None: neither)."""
    if token_env and token_file:
        raise RetrieveError("--token-env and --token-file: give one of them, not both")
    if token_env:
        value = os.environ.get(token_env)
        if value is None or not value.strip():
            raise RetrieveError(f"--token-env {token_env}: the environment variable is not set or empty")
        return _checked(value.strip(), f"--token-env {token_env}")
    if token_file:
        try:
            value = Path(token_file).read_text(encoding="utf-8").strip()
            mode = Path(token_file).stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise RetrieveError(f"--token-file {token_file}: cannot be read ({type(exc).__name__})") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("--token-file %s can be read by other users; chmod 600 it", token_file)
        return _checked(value, f"--token-file {token_file}")
    return None


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise RetrieveError(
            f"{where}: the token must be at least {MIN_TOKEN_CHARS} characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Listening beyond loopback needs a token or an explicit --insecure-no-auth."""
    if token and insecure_no_auth:
        raise RetrieveError("--insecure-no-auth with an access token: give one or the other")
    if not is_loopback(host) and not token and not insecure_no_auth:
        raise RetrieveError(
            f"--host {host}: listening beyond loopback hands patients' images to anyone who can reach it; "
            "give an access token (--token-env VAR or --token-file FILE) or, knowingly, --insecure-no-auth"
        )


def bearer_ok(authorization: bytes | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token.encode("utf-8"))
