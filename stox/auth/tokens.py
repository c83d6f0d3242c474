"""Bearer tokens: JWTs signed and verified locally with pyjwt, algorithms pinned.

HS256 with a shared secret by default; EdDSA (Ed25519) or RS256 with a key pair when
configured, so a gateway can hold only the public key: it verifies tokens but cannot issue
them (`CannotIssue`). Exactly one algorithm is accepted, so neither `alg: none` nor a token
"signed" with the public key as an HMAC secret gets through.

Verification runs on every request, so verified tokens are cached (bounded, until they
expire): a busy service presenting the same token costs one signature check, not thousands.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

USER, ADMIN, SERVICE = "user", "admin", "service"
REVIEWER = "reviewer"  # a user who may also decide review steps of anyone's workflows
ROLES = (USER, ADMIN, SERVICE, REVIEWER)
HS256, EDDSA, RS256 = "HS256", "EdDSA", "RS256"
ALGORITHMS = (HS256, EDDSA, RS256)
MIN_RSA_BITS = 2048

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey
_KEY_TYPES: dict[str, tuple[type, type]] = {
    EDDSA: (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey),
    RS256: (rsa.RSAPrivateKey, rsa.RSAPublicKey),
}


class InvalidToken(Exception):
    """Missing, malformed, expired, tampered or otherwise unacceptable token."""


class CannotIssue(RuntimeError):
    """This authority holds only the public key: it verifies tokens but does not sign them."""


class BadKey(ValueError):
    """A key file that cannot be used with the configured algorithm."""


def load_private_key(pem: bytes, algorithm: str) -> PrivateKey:
    """An unencrypted PEM private key of the kind `algorithm` needs; BadKey otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BadKey(f"not an unencrypted PEM private key ({exc})") from None
    return cast(PrivateKey, _checked(key, algorithm, private=True))


def load_public_key(pem: bytes, algorithm: str) -> PublicKey:
    """A PEM public key of the kind `algorithm` needs; BadKey otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadKey(f"not a PEM public key ({exc})") from None
    return cast(PublicKey, _checked(key, algorithm, private=False))


def _checked(key: Any, algorithm: str, *, private: bool) -> Any:
    if algorithm not in _KEY_TYPES:
        raise BadKey(f"{algorithm} takes a secret, not a key pair")
    wanted = _KEY_TYPES[algorithm][0 if private else 1]
    if not isinstance(key, wanted):
        kind = "Ed25519" if algorithm == EDDSA else "RSA"
        raise BadKey(f"{algorithm} needs an {kind} key, not {type(key).__name__}")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise BadKey(f"an RSA key of {key.key_size} bits is too short (<{MIN_RSA_BITS})")
    return key


def _public_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


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

    @property
    def can_review_any(self) -> bool:
        """Reviewers and admins decide review steps of every workflow; others their own."""
        return self.role in (REVIEWER, ADMIN)


class TokenAuthority:
    """Issues and verifies tokens with one algorithm: HS256 (`secret`), EdDSA or RS256 (keys).

    With a key pair, `private_key` signs; `public_key` verifies and defaults to the private
    key's own. Given only `public_key`, the authority verifies but `issue` raises CannotIssue.
    """

    def __init__(
        self,
        secret: str = "",
        *,
        algorithm: str = HS256,
        private_key: PrivateKey | None = None,
        public_key: PublicKey | None = None,
        issuer: str = "stox",
        audience: str = "stox",
        expiry: float = 3600.0,
        cache_size: int = 10_000,
    ) -> None:
        self.algorithm = algorithm
        self._secret = secret
        self._signing_key: Any
        self._verifying_key: Any
        if algorithm == HS256:
            if not secret or private_key is not None or public_key is not None:
                raise ValueError("HS256 takes a secret (and no keys)")
            self._signing_key = self._verifying_key = secret
        elif algorithm in _KEY_TYPES:
            if secret or (private_key is None and public_key is None):
                raise ValueError(f"{algorithm} takes a private or a public key (and no secret)")
            if private_key is not None:
                _checked(private_key, algorithm, private=True)
            if public_key is not None:
                _checked(public_key, algorithm, private=False)
            if private_key is not None:
                own = private_key.public_key()
                if public_key is not None and _public_bytes(own) != _public_bytes(public_key):
                    raise BadKey("the public key is not the private key's")
                public_key = own
            self._signing_key, self._verifying_key = private_key, public_key
        else:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {algorithm!r}")
        self.issuer = issuer
        self.audience = audience
        self.expiry = expiry
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size

    @property
    def can_issue(self) -> bool:
        return self._signing_key is not None

    def issue(self, subject: str, username: str, role: str, expires_in: float | None = None) -> str:
        if self._signing_key is None:
            raise CannotIssue(f"only the {self.algorithm} public key is configured")
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
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)

    def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                return cached
            del self._cache[token]
        try:
            claims = jwt.decode(
                token,
                self._verifying_key,
                algorithms=[self.algorithm],
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
