"""Where a bearer token travels, read in one place for every way in: the `Authorization`
header of a request (or of an AMQP report, in its headers) and the WebSocket subprotocols
a browser can set (`Sec-WebSocket-Protocol: bearer, <jwt>`)."""

from __future__ import annotations

SCHEME = "bearer"


def from_authorization(value: object) -> str | None:
    """The token of `Bearer <token>` (the scheme in any case); None for anything else."""
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == SCHEME and token else None


def from_subprotocols(value: str) -> str | None:
    """The token of `bearer, <token>`; None for any other list of subprotocols."""
    protocols = [p.strip() for p in value.split(",")]
    if len(protocols) == 2 and protocols[0].lower() == SCHEME and protocols[1]:
        return protocols[1]
    return None
