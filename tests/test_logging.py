"""Credentials never reach a log line; the JSON log format is one object per line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from support import RunningGateway, running_gateway

from stox.logs import JSONFormatter, RedactClientInput, configure

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FULL = logging.Formatter("%(levelname)s %(name)s %(message)s")


def rendered(record: logging.LogRecord) -> str:
    """Everything a handler could write for the record: message, traceback, stack."""
    text = FULL.format(record)
    return text + JSONFormatter().format(record) + repr(record.args)


def leaks(records: list[logging.LogRecord], secrets: list[str]) -> list[str]:
    return [
        f"{record.name}: {record.getMessage()}"
        for record in records
        if any(secret in rendered(record) for secret in secrets)
    ]


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger
    caplog.set_level(logging.DEBUG, logger="stox.access")
    return caplog


async def ws_status(gw: RunningGateway, query: str, **kwargs: Any) -> int:
    """Open /ws?query; 101 when it upgrades (then read the snapshot and close)."""
    request = tornado.httpclient.HTTPRequest(
        f"{gw.ws_url}?{query}", headers={"Origin": gw.base_url}, request_timeout=10
    )
    try:
        conn = await tornado.websocket.websocket_connect(request, **kwargs)
    except tornado.httpclient.HTTPClientError as exc:
        return exc.code
    message = await conn.read_message()
    assert message is not None
    conn.close()
    return 101


async def test_tokens_never_reach_a_log_line(
    tmp_path: Path, capture: pytest.LogCaptureFixture
) -> None:
    async with running_gateway(tmp_path) as gw:
        user = gw.token("alice")
        service = gw.service_token("imaging")
        forged = user[:-6] + "AAAAAA"  # a token that fails verification
        secrets = [user, service, forged, gw.gateway.settings.jwt.secret]

        # bearer tokens in the Authorization header: accepted, refused, on several paths
        workflow_id = await gw.upload(user, images=["https://img.example/a.jpg"])
        assert (await gw.fetch("GET", "/api/v1/workflow/list", token=user)).status == 200
        assert (await gw.fetch("GET", "/api/v1/workflow/list", token=forged)).status == 401
        assert (await gw.fetch("GET", "/api/v1/workflow/list", token=service)).status == 403
        status = f"/api/v1/workflow/status?workflow_id={workflow_id}"
        assert (await gw.fetch("GET", status, token=user)).status == 200
        bad_report = {"workflow_id": workflow_id, "step_id": "0" * 32, "success": True}
        response = await gw.fetch(
            "POST", "/api/v1/workflow/step-completed", bad_report, token=service
        )
        assert response.status == 409

        # ?token= on an API path (not accepted there) and on /ws (accepted there)
        for token in (user, forged):
            assert (await gw.fetch("GET", f"{status}&token={token}")).status == 401
            assert (await gw.fetch("GET", f"/nowhere?token={token}", token=token)).status == 404
        assert await ws_status(gw, f"token={user}") == 101
        assert await ws_status(gw, f"token={user}&workflow_id={workflow_id}") == 101
        assert await ws_status(gw, f"token={forged}") == 401
        assert await ws_status(gw, f"token={service}") == 403
        assert await ws_status(gw, f"token={user}&workflow_id=nothex") == 400
        assert await ws_status(gw, "workflow_id=x", subprotocols=["bearer", user]) == 400

        # a query Tornado cannot decode, next to the token: its error names the request
        assert await ws_status(gw, f"token={user}&workflow_id=%ff") == 400
        assert (await gw.fetch("GET", f"{status}&token={user}&x=%ff", token=user)).status == 400

        # an unexpected failure: its error log names the request, too
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the store fell over")

        gw.gateway.orchestrator.list_workflows = broken  # type: ignore[method-assign]
        response = await gw.fetch("GET", f"/api/v1/workflow/list?token={user}", token=user)
        assert response.status == 500

    records = capture.records
    access = [r.getMessage() for r in records if r.name == "stox.access"]
    assert any("/api/v1/workflow/list" in line for line in access)  # the request log ran
    assert any(" /ws " in line for line in access)
    assert any(r.levelno >= logging.ERROR for r in records)  # so did the error log
    assert leaks(records, secrets) == []


async def raw_status(gw: RunningGateway, request: str) -> int:
    """Send a request as bytes (latin-1) on a fresh connection; the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_tornado_s_own_messages_never_show_a_piece_of_a_token(
    tmp_path: Path, capture: pytest.LogCaptureFixture
) -> None:
    async with running_gateway(tmp_path) as gw:
        token = gw.token("alice")
        workflow_id = await gw.upload(token)

        # query values that are not UTF-8: Tornado quotes the start of the value it refuses
        assert await ws_status(gw, f"token={token}%ff") == 400
        assert await ws_status(gw, f"token={token}%ff&workflow_id={workflow_id}") == 400
        assert await ws_status(gw, f"workflow_id={workflow_id}&token=%ff{token}") == 400
        status = f"/api/v1/workflow/status?workflow_id={workflow_id}"
        assert (await gw.fetch("GET", f"{status}&token={token}%ff", token=token)).status == 400

        # header values Tornado cannot parse: it quotes them whole
        handshake = (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {gw.base_url}\r\n"
        )
        api = f"GET {status} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        requests = [
            f"{api}Authorization: Bearer {token}\x01\r\n\r\n",
            f"{api}Authorization: {token}\x7f\r\n\r\n",
            f"{handshake}Sec-WebSocket-Protocol: bearer, {token}\x01\r\n\r\n",
            f"{handshake}Sec-WebSocket-Protocol: bearer,\x7f{token}\r\n\r\n",
        ]
        for request in requests:
            assert await raw_status(gw, request) == 400

        # malformed, but parsed: refused by the gateway
        assert await ws_status(gw, "", subprotocols=["bearer", token, "extra"]) == 401
        assert await ws_status(gw, "", subprotocols=[f"bearer {token}"]) == 401

    records = capture.records
    pieces = {token[i : i + 8] for i in range(len(token) - 7)}
    leaked = [
        f"{record.name}: {rendered(record)}"
        for record in records
        if any(piece in rendered(record) for piece in pieces)
    ]
    assert leaked == []
    # Tornado did speak, and its messages still say what was wrong
    messages = [r.getMessage() for r in records if r.name.startswith("tornado.")]
    assert any("Invalid unicode in token" in message for message in messages), messages
    assert any("Invalid header value" in message for message in messages), messages


async def test_passwords_and_login_tokens_never_reach_a_log_line(
    tmp_path: Path, capture: pytest.LogCaptureFixture
) -> None:
    password, wrong, short = "correct horse battery", "wrong horse battery", "tiny-secret"
    register, login = "/api/v1/auth/register", "/api/v1/auth/login"
    # the test client is the trusted proxy: X-Real-IP sets the address of carol's attempts
    trusted: dict[str, Any] = {"server__trusted_proxies": ["127.0.0.1"]}
    async with running_gateway(tmp_path, auth__retry_backoff=0.01, **trusted) as gw:
        server = gw.gateway.auth_server
        assert server is not None
        credentials = {"username": "alice", "password": password}
        assert (await gw.fetch("POST", register, credentials)).status == 201
        assert (await gw.fetch("POST", register, credentials)).status == 409
        short_body = {"username": "bob", "password": short}
        assert (await gw.fetch("POST", register, short_body)).status == 400
        response = await gw.fetch("POST", login, credentials)
        token = response.body["access_token"]
        for name in ("alice", "nobody"):
            body = {"username": name, "password": wrong}
            assert (await gw.fetch("POST", login, body)).status == 401
        for body in ({"token": token}, {"token": token[:-4] + "AAAA"}):
            assert (await gw.fetch("POST", "/api/v1/auth/validate", body)).status in (200, 401)
        assert (await gw.fetch("GET", "/api/v1/auth/profile", token=token)).status == 200
        for _ in range(10):
            body = {"username": "carol", "password": wrong}
            await gw.fetch("POST", login, body, headers={"X-Real-IP": "10.9.9.9"})
        limited = {"username": "carol", "password": password}
        assert (
            await gw.fetch("POST", login, limited, headers={"X-Real-IP": "10.9.9.9"})
        ).status == 429

        # failures inside the AuthService are logged, by name, without the request
        async def broken(username: str, password: str) -> dict[str, Any]:
            raise RuntimeError(f"failed for {username} with {password}")

        server.accounts.authenticate = broken  # type: ignore[method-assign]
        assert (await gw.fetch("POST", login, credentials)).status == 502
        await server.store.close()  # the user store goes away
        assert (await gw.fetch("POST", register, {**credentials, "username": "dave"})).status == 503

    records = capture.records
    assert any(r.levelno >= logging.ERROR and "AuthService" in r.getMessage() for r in records)
    assert any(" /api/v1/auth/login " in r.getMessage() for r in records if r.name == "stox.access")
    assert leaks(records, [password, wrong, short, token]) == []


def test_the_redaction_keeps_tornado_s_own_words_and_tracebacks() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    try:
        raise ValueError(f"refused Authorization: Bearer {jwt} for /ws?token={jwt}")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "tornado.general",
        logging.WARNING,
        __file__,
        1,
        'Can "Upgrade" only to "WebSocket": %s, %r, %r',
        ("GET /ws?token=x&workflow_id=y (127.0.0.1)", "it's", b"\xffabc"),
        exc_info,
    )
    assert RedactClientInput().filter(record)
    assert record.getMessage() == (
        'Can "Upgrade" only to "WebSocket": GET /ws?[redacted] (127.0.0.1), [redacted], [redacted]'
    )
    text = FULL.format(record)
    assert jwt[:8] not in text and "token=" not in text
    assert 'raise ValueError(f"refused Authorization: Bearer' in text  # source, quotes and all
    assert "ValueError: refused Authorization: Bearer [redacted] for /ws?[redacted]" in text
    assert json.loads(JSONFormatter().format(record))["exc"] == record.exc_text


def test_json_formatter_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("stox.test_logging.json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.debug("plain")
        logger.info("with %s and %d", "args", 42)
        logger.warning('two\nlines, "quotes" and ünïcödé')
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "message"} <= entry.keys()
        assert TS.match(entry["ts"]), entry["ts"]
        assert entry["logger"] == "stox.test_logging.json"
    assert [e["level"] for e in entries] == ["debug", "info", "warning", "error"]
    assert [e["message"] for e in entries] == [
        "plain",
        "with args and 42",
        'two\nlines, "quotes" and ünïcödé',
        "failed",
    ]
    assert "exc" not in entries[0]
    assert "ValueError: bad\nvalue" in entries[3]["exc"]


def test_json_formatter_timestamp_is_utc_with_milliseconds() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z
    record.msecs = 250.0
    entry = json.loads(JSONFormatter().format(record))
    assert entry == {
        "ts": "2026-01-01T00:00:00.250Z",
        "level": "info",
        "logger": "x",
        "message": "m",
    }


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root, pika, pymongo = (logging.getLogger(name) for name in ("", "pika", "pymongo"))
    handlers, levels = root.handlers[:], [logger.level for logger in (root, pika, pymongo)]
    yield
    root.handlers[:] = handlers
    for logger, level in zip((root, pika, pymongo), levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_json_writes_json_lines_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure("debug", "json")
    logging.getLogger("stox.test_logging.configure").debug("hello %s", "there")
    assert logging.getLogger().level == logging.DEBUG
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line]
    entry = json.loads(line)
    assert entry["message"] == "hello there"
    assert entry["level"] == "debug"
    assert entry["logger"] == "stox.test_logging.configure"


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_leaves_pika_s_narration_to_debug() -> None:
    configure("info", "json")
    assert logging.getLogger("pika").level == logging.CRITICAL  # the bus says it in one line
    configure("debug", "json")
    assert logging.getLogger("pika").level == logging.WARNING
    assert logging.getLogger("pymongo").level == logging.INFO  # not every command, documents too


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_text_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", "text")
    log = logging.getLogger("stox.test_logging.text")
    log.info("hidden")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert re.search(r" WARNING stox\.test_logging\.text shown$", err.strip())
