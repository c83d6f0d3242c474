"""The binary's entry point: the `stox` command (serve, token, user, auth-service)."""

import sys

from server import cli

if __name__ == "__main__":
    sys.exit(cli())
