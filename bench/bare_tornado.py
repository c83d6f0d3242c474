"""The ceiling for bench/e2e.py: a bare Tornado app with one JSON POST handler.

It does the least any JSON endpoint on one Tornado process does (parse a small JSON body,
answer a small JSON body) and nothing else: no auth, no validation, no store, no bus. It runs
on the event loop the gateway runs on by default (uvloop's, when installed), so that the two
compare like for like.
Whatever the gateway reaches is measured against what this reaches on the same machine
with the same client.

    python bench/bare_tornado.py --port 8099     # POST /echo, GET /readyz; SIGTERM stops it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import tornado.httpserver
import tornado.web


class EchoHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            self.set_status(400)
            self.finish(b'{"error":{"code":"invalid_json","message":"not JSON"}}')
            return
        reply = {
            "result": "applied",
            "workflow_id": body.get("workflow_id") if isinstance(body, dict) else None,
            "status": "running",
            "version": 1,
        }
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(reply, separators=(",", ":")))


class ReadyHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"status":"ready"}')


async def serve(host: str, port: int) -> None:
    app = tornado.web.Application([(r"/echo", EchoHandler), (r"/readyz", ReadyHandler)])
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    await server.close_all_connections()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
