"""Change notifications go to the hubs in batches: one bus message for the changes of a turn.

Every transition emits a `workflow.changed` notification (its outbox entry), which every
instance's WebSocket hub consumes. Sent one by one, they are the larger part of a workflow's
broker traffic: each a publish with its confirm, and a delivery, a decode and an ack on every
instance. So the notifications published in one turn of the loop go out together, as one
`workflow.changes` message whose payload lists them (`{"event": "workflow.changes",
"notifications": [{"message_id": …, "payload": …}, ...]}`, each payload exactly that of its
`workflow.changed`), and
each counts as published once that message is confirmed; a batch the bus does not confirm
leaves every notification in it to the relay. A notification waits for at most the rest of
its turn; a batch holds at most MAX_BATCH_BYTES of payloads (a larger turn makes several).

Hubs also accept single `workflow.changed` notifications, as an instance of an earlier
version publishes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from stox.bus.base import Event, EventBus
from stox.ids import new_id
from stox.logs import detached

CHANGES_ROUTING_KEY = "workflow.changes"
MAX_BATCH_BYTES = 256 * 1024


class ChangeBatcher:
    """Publishes notifications (their payloads, encoded) in batches, one per turn of the loop."""

    def __init__(self, bus: EventBus, clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.clock = clock
        self._batch: list[_Notification] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def publish(self, message_id: str, payload: dict[str, Any], body: str) -> None:
        """Once the batch holding the notification (`payload`, encoded as `body`) is
        confirmed; what the bus raised otherwise."""
        loop = asyncio.get_running_loop()
        confirmed: asyncio.Future[None] = loop.create_future()
        if not self._batch:  # the batch is of many workflows: not in this one's log context
            loop.call_soon(self._send_batch, context=detached())
        item = {"message_id": message_id, "payload": payload}
        text = f'{{"message_id":"{message_id}","payload":{body}}}'
        self._batch.append((item, text, confirmed))
        await confirmed

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        start = size = 0
        for end, (_, body, _) in enumerate(batch):
            if size and size + len(body) > MAX_BATCH_BYTES:
                self._send(batch[start:end])
                start, size = end, 0
            size += len(body)
        self._send(batch[start:])

    def _send(self, batch: list[_Notification]) -> None:
        task = asyncio.ensure_future(self._publish(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, batch: list[_Notification]) -> None:
        bodies = ",".join(body for _, body, _ in batch)
        event = Event(
            routing_key=CHANGES_ROUTING_KEY,
            payload={"event": CHANGES_ROUTING_KEY, "notifications": [p for p, _, _ in batch]},
            message_id=new_id(),
            timestamp=self.clock(),
            body=f'{{"event":"{CHANGES_ROUTING_KEY}","notifications":[{bodies}]}}',
        )
        try:
            await self.bus.publish(event)
        except BaseException as exc:
            for _, _, confirmed in batch:
                if not confirmed.done():
                    confirmed.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _, _, confirmed in batch:
            if not confirmed.done():
                confirmed.set_result(None)


# {message_id, payload}, that encoded, and its confirmation
_Notification = tuple[dict[str, Any], str, asyncio.Future[None]]
