"""Print a gateway's live workflow changes: a minimal WebSocket client.

python examples/watch.py --token "$TOKEN" [--workflow-id ID] [--url ws://127.0.0.1:8080/ws]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from urllib.parse import urlsplit

import tornado.httpclient
import tornado.websocket


async def watch(url: str, token: str, workflow_id: str | None) -> None:
    if workflow_id:
        url += f"?workflow_id={workflow_id}"
    parts = urlsplit(url)
    origin = f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"
    request = tornado.httpclient.HTTPRequest(url, headers={"Origin": origin})
    conn = await tornado.websocket.websocket_connect(request, subprotocols=["bearer", token])
    try:
        while (raw := await conn.read_message()) is not None:
            message = json.loads(raw)
            workflow = message["data"].get("workflow", message["data"])
            step = message["data"].get("step") or ""
            print(
                f"{message['ts']}  {message['workflow_id'][:8]}  v{message['version']:<3} "
                f"{message['type']:<20} {step:<17} workflow {workflow['status']}",
                flush=True,
            )
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", required=True, help="a user token (python -m stox token)")
    parser.add_argument("--workflow-id", help="watch one workflow (default: all of yours)")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="the gateway's /ws URL")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(args.url, args.token, args.workflow_id))


if __name__ == "__main__":
    main()
