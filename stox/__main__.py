"""`python -m stox token --user NAME [--role admin]` / `--service NAME`: print a signed token."""

from __future__ import annotations

import argparse
import sys

import settings as settings_module
from stox.app import make_tokens
from stox.auth.tokens import ADMIN, SERVICE, USER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stox")
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="print a signed bearer token")
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user name")
    who.add_argument("--service", help="a service name (may report step completions)")
    token.add_argument("--role", choices=[USER, ADMIN], default=USER, help="role of a --user")
    token.add_argument("--expires-in", type=float, help="lifetime in seconds (default jwt.expiry)")
    token.add_argument("--config", help="the gateway's YAML settings file")
    args = parser.parse_args(argv)

    config_args = ["--config", args.config] if args.config else []
    try:
        tokens = make_tokens(settings_module.load(config_args), issuing=True)
    except settings_module.SettingsError as exc:
        print(f"stox: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.service:
        subject, name, role = f"service:{args.service}", args.service, SERVICE
    else:
        subject, name, role = args.user, args.user, args.role
    print(tokens.issue(subject, name, role, args.expires_in))
    return 0


if __name__ == "__main__":
    sys.exit(main())
