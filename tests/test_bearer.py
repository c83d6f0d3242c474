"""Bearer tokens are read one way, wherever they travel (stox/auth/bearer.py)."""

from __future__ import annotations

import pytest

from stox.auth import bearer


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc.def", "abc.def"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("", None),
        (None, None),
        (42, None),  # an AMQP header can hold anything
    ],
)
def test_the_authorization_header(value: object, token: str | None) -> None:
    assert bearer.from_authorization(value) == token


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("bearer, abc", "abc"),
        ("Bearer,abc", "abc"),
        ("bearer", None),
        ("bearer, ", None),
        ("chat, abc", None),
        ("bearer, abc, extra", None),
        ("", None),
    ],
)
def test_the_websocket_subprotocols(value: str, token: str | None) -> None:
    assert bearer.from_subprotocols(value) == token
