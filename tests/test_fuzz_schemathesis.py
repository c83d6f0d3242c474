"""Schemathesis against a real gateway process (tests/fuzz.py): every operation of the
document, then the stateful run along its links, with no failed check.

A few examples each, for the suite's time budget: STOX_FUZZ_EXAMPLES (per operation and mode)
and STOX_FUZZ_SCENARIOS (stateful) raise them; `make fuzz` runs many and prints the counts."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import fuzz
import pytest
from support import RunningGateway

from stox.auth.tokens import ADMIN, SERVICE, USER

EXAMPLES = int(os.environ.get("STOX_FUZZ_EXAMPLES", "5"))
SCENARIOS = int(os.environ.get("STOX_FUZZ_SCENARIOS", "8"))
WORKFLOWS = "/api/v1/workflow/"  # operations that need a user's or a service's token
BUDGET = max(60, (EXAMPLES + SCENARIOS) * 3)  # seconds; the default run takes 15-30


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with fuzz.fuzz_gateway(tmp_path_factory.mktemp("fuzz")) as gw:
        yield gw


@pytest.mark.timeout(BUDGET)
def test_every_operation_answers_as_the_document_says(fuzzed: RunningGateway) -> None:
    tally = fuzz.fuzz_operations(fuzzed, EXAMPLES)
    report = tally.report(f"operations (at most {EXAMPLES} per mode):")
    print(report)
    document = fuzz.load(fuzzed)
    assert set(tally.examples) == {op.label for op in fuzz.operations(document)}, report
    assert not tally.failures, report
    # the tokens varied: refused without the right one (401, 403), admitted with it
    workflows = [s for op, s in tally.statuses.items() if op.split()[1].startswith(WORKFLOWS)]
    answers = sum(workflows, Counter[int]())
    assert answers[401] and answers[403] and (answers[200] or answers[202]), report


@pytest.mark.timeout(BUDGET)
def test_the_stateful_run_follows_the_links_and_answers_as_documented(
    fuzzed: RunningGateway,
) -> None:
    tally = fuzz.fuzz_stateful(fuzzed, SCENARIOS)
    report = tally.report(f"stateful ({SCENARIOS} scenarios):")
    print(report)
    assert tally.scenarios >= SCENARIOS and not tally.failures, report
    # a random workflow id is never found: a 200 here came from a link to a real workflow
    linked = ("status", "cancel", "retry", "step-completed")
    assert any(tally.statuses[op][200] for op in tally.statuses if op.endswith(linked)), report


@pytest.mark.parametrize(
    ("role", "sent", "status", "conforms"),
    [
        (USER, USER, 200, True),
        (USER, ADMIN, 404, True),
        (USER, USER, 401, False),  # the right token refused
        (USER, SERVICE, 403, True),
        (USER, SERVICE, 200, False),  # another role's admitted
        (SERVICE, USER, 403, True),
        (SERVICE, fuzz.NONE, 401, True),
        (SERVICE, fuzz.FORGED, 400, False),  # a forged token got past the check
        (USER, fuzz.NONE, 413, True),  # too large: refused before the token is read
        (None, fuzz.NONE, 200, True),
    ],
)
def test_the_auth_check_tells_admitted_from_refused(
    role: str | None, sent: str, status: int, conforms: bool
) -> None:
    if conforms:
        fuzz.check_auth(role, sent, status)
    else:
        with pytest.raises(fuzz.AuthNotConforming):
            fuzz.check_auth(role, sent, status)
