"""Entry point: load settings, start the gateway on one IOLoop (uvloop's by default), serve,
shut down cleanly.

`python server.py [flags]` serves; the installed `stox` command (`cli`) is `stox serve [flags]`
beside `stox token`, `stox user` and `stox auth-service` (stox/__main__.py's commands).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import handlers
import settings as settings_module
from handlers.server import make_http_server
from stox import __main__ as commands
from stox import gc_tuning, version
from stox.app import Gateway, new_instance_id
from stox.logs import configure
from stox.loops import run, running_loop
from stox.store import StoreError

log = logging.getLogger("stox.server")


async def serve(settings: settings_module.Settings) -> None:
    gateway = Gateway(settings, completion_path=handlers.completion_path())
    await gateway.start()
    server = make_http_server(handlers.make_app(gateway), settings.server)
    server.listen(settings.server.port, settings.server.host)
    metrics = handlers.metrics_server(gateway)
    gc_tuning.tune()
    log.info(
        "%s: gateway %s listening on %s (store %s, bus %s, loop %s%s)",
        version.describe(),
        gateway.instance_id,
        settings.public_url,
        settings.storage.url.split("@")[-1],
        gateway.bus.kind,
        running_loop(),
        ", demo workers" if settings.demo_workers else "",
    )
    if metrics is not None:
        log.info("metrics on their own server at %s", settings.metrics.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    if metrics is not None:
        metrics.stop()
    await server.close_all_connections()
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_module.load(argv)
    except settings_module.SettingsError as exc:
        print(f"stox: configuration error: {exc}", file=sys.stderr)
        return 2
    # named on every JSON log line, and by the Gateway (its queue, its broker connection)
    settings.server.instance_id = settings.server.instance_id or new_instance_id()
    configure(settings.logging.level, settings.logging.format, settings.server.instance_id)
    try:
        run(serve(settings), settings.server.event_loop)
    except settings_module.SettingsError as exc:
        print(f"stox: configuration error: {exc}", file=sys.stderr)
        return 2
    # a broker that cannot be reached, a store that cannot be opened or written, a port taken
    except (OSError, StoreError) as exc:
        print(f"stox: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The `stox` command."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="stox", description="The Stox gateway and its tools.")
    parser.add_argument("--version", action="version", version=version.describe())
    subcommands = parser.add_subparsers(dest="command", required=True)
    subcommands.add_parser(
        "serve",
        parents=[settings_module.parser()],
        add_help=False,  # the parent's -h
        help="run the gateway (python server.py)",
        description=settings_module.parser().description,
    )
    commands.add_commands(subcommands)
    args = parser.parse_args(argv)
    if args.command == "serve":  # its flags are the settings' own, which `main` reads
        return main(argv[1:])
    return commands.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
