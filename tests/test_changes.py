"""Change notifications travel in batches, one bus message for those of a turn of the loop."""

from __future__ import annotations

import asyncio
import json

import pytest
from support import RecordingBus

from stox.bus.base import Event, PublishError
from stox.changes import CHANGES_ROUTING_KEY, MAX_BATCH_BYTES, ChangeBatcher


def notification(n: int, size: int = 0) -> tuple[str, dict[str, object], str]:
    payload: dict[str, object] = {
        "event": "workflow.changed",
        "workflow_id": f"w{n}",
        "pad": "x" * size,
    }
    return f"m{n}", payload, json.dumps(payload, separators=(",", ":"))


class BatchesBus(RecordingBus):
    """Keeps each message as published, batches whole, beside what RecordingBus keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.messages.append(event)
        await super().publish(event)


async def test_the_notifications_of_one_turn_are_one_message() -> None:
    bus = BatchesBus()
    batcher = ChangeBatcher(bus)
    await asyncio.gather(*(batcher.publish(*notification(n)) for n in range(5)))
    [batch] = bus.messages
    assert batch.routing_key == CHANGES_ROUTING_KEY
    assert json.loads(batch.body or "") == batch.payload  # the body is the payload, encoded
    items = batch.payload["notifications"]
    assert [item["message_id"] for item in items] == [f"m{n}" for n in range(5)]
    assert [item["payload"] for item in items] == [notification(n)[1] for n in range(5)]


async def test_a_batch_the_bus_does_not_confirm_fails_every_notification_in_it() -> None:
    bus = RecordingBus()
    bus.fail = True
    batcher = ChangeBatcher(bus)
    results = await asyncio.gather(
        *(batcher.publish(*notification(n)) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, PublishError) for r in results)


async def test_a_turn_larger_than_the_bound_makes_several_batches() -> None:
    bus = BatchesBus()
    batcher = ChangeBatcher(bus)
    size = MAX_BATCH_BYTES // 3
    await asyncio.gather(*(batcher.publish(*notification(n, size)) for n in range(7)))
    assert [len(m.payload["notifications"]) for m in bus.messages] == [2, 2, 2, 1]
    assert [e.message_id for e in bus.events] == [f"m{n}" for n in range(7)]  # all, in order


@pytest.mark.parametrize("turns", [2, 3])
async def test_each_turn_its_own_batch(turns: int) -> None:
    bus = BatchesBus()
    batcher = ChangeBatcher(bus)
    for turn in range(turns):
        await batcher.publish(*notification(turn))
    assert len(bus.messages) == turns
    assert [e.message_id for e in bus.events] == [f"m{n}" for n in range(turns)]
