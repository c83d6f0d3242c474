"""Bearer tokens: JWTs signed and verified locally with pyjwt, algorithms pinned.

Verification runs on every request, so verified tokens are cached (bounded, until they
expire): a busy service presenting the same token costs one signature check, not thousands.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

USER, ADMIN, SERVICE = "user", "admin", "service"
ROLES = (USER, ADMIN, SERVICE)
ALGORITHM = "HS256"


class InvalidToken(Exception):
    """Missing, malformed, expired, tampered or otherwise unacceptable token."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    id: str
    username: str
    role: str
    expires_at: float

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


class TokenAuthority:
    def __init__(
        self,
        secret: str,
        *,
        issuer: str = "stox",
        audience: str = "stox",
        expiry: float = 3600.0,
        cache_size: int = 10_000,
    ) -> None:
        if not secret:
            raise ValueError("a token secret is required")
        self._secret = secret
        self.issuer = issuer
        self.audience = audience
        self.expiry = expiry
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size

    def issue(self, subject: str, username: str, role: str, expires_in: float | None = None) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": subject,
            "username": username,
            "role": role,
            "iat": now,
            "exp": now + int(self.expiry if expires_in is None else expires_in),
            "iss": self.issuer,
            "aud": self.audience,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                return cached
            del self._cache[token]
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
        role = claims.get("role")
        if role not in ROLES or not isinstance(claims["sub"], str):
            raise InvalidToken("unknown role or subject")
        principal = Principal(
            id=claims["sub"],
            username=str(claims.get("username", claims["sub"])),
            role=role,
            expires_at=float(claims["exp"]),
        )
        self._cache[token] = principal
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal
