"""Entry point: load settings, start the gateway on one IOLoop (uvloop's by default), serve,
shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import handlers
import settings as settings_module
from handlers.server import make_http_server
from stox import gc_tuning
from stox.app import Gateway
from stox.logs import configure
from stox.loops import run, running_loop

log = logging.getLogger("stox.server")


async def serve(settings: settings_module.Settings) -> None:
    gateway = Gateway(settings, completion_path=handlers.completion_path())
    await gateway.start()
    server = make_http_server(handlers.make_app(gateway), settings.server)
    server.listen(settings.server.port, settings.server.host)
    gc_tuning.tune()
    log.info(
        "stox gateway %s listening on %s (store %s, bus %s, loop %s%s)",
        gateway.instance_id,
        settings.public_url,
        settings.storage.url.split("@")[-1],
        "rabbitmq" if settings.rabbitmq.url else "in-process",
        running_loop(),
        ", demo workers" if settings.demo_workers else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    await server.close_all_connections()
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_module.load(argv)
    except settings_module.SettingsError as exc:
        print(f"stox: configuration error: {exc}", file=sys.stderr)
        return 2
    configure(settings.logging.level, settings.logging.format)
    try:
        run(serve(settings), settings.server.event_loop)
    except settings_module.SettingsError as exc:
        print(f"stox: configuration error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # a broker that cannot be reached at start-up
        print(f"stox: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
