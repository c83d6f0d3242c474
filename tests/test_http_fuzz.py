"""Random input against a real gateway: nothing a client sends gets a 5xx, and every refusal
is in the one error shape."""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import quote

from support import CANCEL, COMPLETED, LIST, RETRY, STATUS, UPLOAD, RunningGateway, assert_error

_KEYS = [
    "name",
    "description",
    "images",
    "category",
    "price",
    "metadata",
    "workflow_id",
    "step_id",
    "step_type",
    "success",
    "result",
    "error",
    "",
    "ünï",
    "$where",
    "a.b",
]


def _random_scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            2**70,
            -(2**64),
            rng.uniform(-1e300, 1e300),
            1e-320,
            "",
            "x" * rng.randint(1, 300),
            "a" * 32,
            "0" * 32,
            "é😀\u202e",
            "\x00",
            "null",
        ]
    )


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.5:
        return _random_scalar(rng)
    if roll < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(_KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _random_body(rng: random.Random, template: dict[str, Any]) -> bytes:
    """Random bytes, random JSON, or a valid body with a few fields broken."""
    roll = rng.random()
    if roll < 0.15:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if roll < 0.35:
        return json.dumps(_random_value(rng)).encode()
    body = dict(template)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(template) + _KEYS)
        if rng.random() < 0.2:
            body.pop(key, None)
        else:
            body[key] = _random_value(rng)
    text = json.dumps(body)
    if rng.random() < 0.15:  # things json.dumps will not write: NaN, lone surrogates, depth
        text = text.replace("null", rng.choice(["NaN", '"\\ud800"', "[" * 50 + "]" * 50]), 1)
    return text.encode()


async def test_random_input_never_gets_a_5xx(gw: RunningGateway) -> None:
    rng = random.Random(20260514)
    user, service = gw.token(), gw.service_token()
    workflow_id = await gw.upload(user)
    step = (await gw.status(workflow_id))["steps"][0]
    templates = {
        UPLOAD: ({"name": "Mug", "price": 1.5, "images": ["i.png"], "metadata": {}}, user),
        COMPLETED: (
            {"workflow_id": workflow_id, "step_id": step["step_id"], "success": False},
            service,
        ),
        CANCEL: ({"workflow_id": workflow_id}, user),
        RETRY: ({"workflow_id": workflow_id}, user),
    }
    statuses: list[int] = []
    for path, (template, token) in templates.items():
        for _ in range(80):
            raw = _random_body(rng, template)
            response = await gw.fetch("POST", path, raw=raw, token=token)
            assert response.status < 500, (path, raw[:300], response.body)
            if response.status >= 400:
                assert_error(response, response.status)
            statuses.append(response.status)
    for _ in range(40):
        value = rng.choice(
            [quote(str(_random_scalar(rng))), "%ff", "%00", "%ed%a0%80", "a" * 32, "-5", "1e3"]
        )
        for query in ("workflow_id", "status", "limit", "cursor"):
            path = STATUS if query == "workflow_id" else LIST
            response = await gw.fetch("GET", f"{path}?{query}={value}", token=user)
            assert response.status < 500, (path, query, value, response.body)
    assert 400 in statuses and any(s < 300 for s in statuses)  # both kinds were reached
    assert (await gw.fetch("GET", "/readyz")).status == 200
