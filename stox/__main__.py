"""The command line beside the server (also the `stox` command's, see `server.cli`):

- `python -m stox token --user NAME [--role admin|reviewer]` / `--service NAME`: print a signed
  token.
- `python -m stox user create NAME [--role admin|reviewer] [--password-stdin]`: add a user to the
  AuthService's store (the password is prompted for, or read from standard input).
- `python -m stox auth-service [--host H] [--port N]`: run the AuthService alone, for gateways
  started with `STOX_AUTH_ADDR=H:N`.

Each reads the usual settings (`--config`, STOX_* variables): the store URL and jwt.*.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import signal
import sys

from marshmallow import ValidationError

import settings as settings_module
from stox import version
from stox.app import make_tokens
from stox.auth import tls
from stox.auth.accounts import Accounts
from stox.auth.passwords import Passwords
from stox.auth.service import AuthServer
from stox.auth.tokens import ADMIN, REVIEWER, SERVICE, USER
from stox.logs import configure
from stox.loops import run, running_loop
from stox.store import AlreadyExists, StoreError, make_user_store

log = logging.getLogger("stox.auth_service")
DEFAULT_AUTH_PORT = 50051


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `token`, `user` and `auth-service` to `commands` (here, and the `stox` command's)."""
    token = commands.add_parser("token", help="print a signed bearer token")
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user name")
    who.add_argument("--service", help="a service name (may report step completions)")
    token.add_argument(
        "--role", choices=[USER, ADMIN, REVIEWER], default=USER, help="role of a --user"
    )
    token.add_argument("--expires-in", type=float, help="lifetime in seconds (default jwt.expiry)")

    user = commands.add_parser("user", help="manage the AuthService's users")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    create = user_commands.add_parser("create", help="create a user")
    create.add_argument("name", help="3-64 of a-z 0-9 _ . -")
    create.add_argument(
        "--role", choices=[USER, ADMIN, REVIEWER], default=USER, help="the user's role"
    )
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of prompting",
    )

    service = commands.add_parser("auth-service", help="run the gRPC AuthService alone")
    service.add_argument("--host", default="127.0.0.1", help="address to listen on")
    service.add_argument(
        "--port", type=int, default=DEFAULT_AUTH_PORT, help="port to listen on (0: a free one)"
    )
    for command in (token, create, service):
        command.add_argument("--config", help="the gateway's YAML settings file")


def dispatch(args: argparse.Namespace) -> int:
    """Run the command that `add_commands`' parsers read into `args`."""
    try:
        settings = settings_module.load(["--config", args.config] if args.config else [])
        if args.command == "token":
            return _token(args, settings)
        if args.command == "user":
            return _create_user(args, settings)
        return _auth_service(args, settings)
    except settings_module.SettingsError as exc:
        print(f"stox: configuration error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stox")
    parser.add_argument("--version", action="version", version=version.describe())
    add_commands(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))


def _token(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    tokens = make_tokens(settings, issuing=True)
    if args.service:
        subject, name, role = f"service:{args.service}", args.service, SERVICE
    else:
        subject, name, role = args.user, args.user, args.role
    print(tokens.issue(subject, name, role, args.expires_in))
    return 0


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != password:
        print("stox: the passwords differ", file=sys.stderr)
        return None
    return password


def _create_user(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    password = _read_password(args.password_stdin)
    if password is None:
        return 1

    async def create() -> dict[str, str]:
        store = make_user_store(
            settings.storage.url, sqlite_synchronous=settings.storage.sqlite_synchronous
        )
        passwords = Passwords.from_settings(settings.auth)
        await store.open()
        try:
            await passwords.start()
            return await Accounts(store, passwords).register(args.name, password, args.role)
        finally:
            passwords.close()
            await store.close()

    try:
        profile = asyncio.run(create())
    except ValidationError as exc:
        print(f"stox: invalid {json.dumps(exc.messages)}", file=sys.stderr)
        return 2
    except AlreadyExists:
        print(f"stox: a user named {args.name!r} already exists", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"stox: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(profile))
    return 0


def _auth_service(args: argparse.Namespace, settings: settings_module.Settings) -> int:
    tokens = make_tokens(settings, issuing=True)
    credentials = tls.server_credentials(settings.auth)
    configure(settings.logging.level, settings.logging.format)

    async def serve() -> None:
        log.info("AuthService starting on the %s event loop", running_loop())
        server = AuthServer.from_settings(settings, tokens, credentials)
        await server.start(args.host, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("AuthService shutting down")
            await server.stop()

    try:
        run(serve(), settings.server.event_loop)
    except (OSError, StoreError) as exc:
        print(f"stox: the AuthService cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
