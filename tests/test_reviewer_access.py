"""Who sees and who changes another user's workflow: a reviewer sees every workflow (so the
dashboard finds what waits for review) but changes none but their own; an admin both."""

from __future__ import annotations

from support import CANCEL, LIST, RETRY, STATUS, RunningGateway


async def test_a_reviewer_reads_anyones_workflow_and_cancels_none_of_theirs(
    gw: RunningGateway,
) -> None:
    bobs = await gw.upload(gw.token("bob"), name="bob's lamp")
    rita = gw.token("rita", role="reviewer")

    status = await gw.fetch("GET", f"{STATUS}?workflow_id={bobs}", token=rita)
    assert status.status == 200 and status.body["owner_name"] == "bob"
    listed = await gw.fetch("GET", LIST, token=rita)
    assert [w["id"] for w in listed.body["workflows"]] == [bobs]
    for path in (CANCEL, RETRY):
        answer = await gw.fetch("POST", path, {"workflow_id": bobs}, token=rita)
        assert answer.status == 404, (path, answer.body)
    # a plain user sees none of it
    alice = gw.token("alice")
    assert (await gw.fetch("GET", f"{STATUS}?workflow_id={bobs}", token=alice)).status == 404
    assert (await gw.fetch("GET", LIST, token=alice)).body["workflows"] == []
    # an admin changes it
    admin = gw.token("root", role="admin")
    cancelled = await gw.fetch("POST", CANCEL, {"workflow_id": bobs}, token=admin)
    assert cancelled.status == 200 and cancelled.body["status"] == "cancelled"
