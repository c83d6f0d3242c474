"""Schemathesis against a real gateway process, from the document it serves.

Every operation of `/api/v1/openapi.json` gets generated requests, valid ones and (where it
takes input) invalid ones, each sent with the token its role needs or, now and then, with none,
a token of another role or one signed with another key; each answer must pass `CHECKS` (no
5xx; its status, content type, headers and body as the document says) and `check_auth` (the
role admitted, the others refused as documented). Then a stateful run
follows the document's links (upload → status → report / cancel → retry) with the owner's
tokens. A failed check is counted and kept, with a curl line that reproduces it, and the run
goes on: `Tally` holds the counts.

`python tests/fuzz.py` (`make fuzz`) runs many and prints them; tests/test_fuzz_schemathesis.py
runs a few in the suite. The gateway runs on the embedded defaults (SQLite, the in-process bus,
the built-in AuthService), demo workers off so that the fuzzer's own reports move the workflows,
no per-user upload limit, cheap password hashes, and one attempt a step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import procs
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import RunningGateway, free_port

from stox.auth import bearer
from stox.auth.tokens import ADMIN, SERVICE, USER, TokenAuthority
from stox.workflow import DEFAULT_STEPS

DOCUMENT = "/api/v1/openapi.json"
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# the embedded defaults, but for what a fuzzer needs (see the module's docstring); one
# attempt a step, so that a failed report fails the workflow and a retry can follow
SETTINGS_YAML = (
    "auth:\n  hash_time_cost: 1\n  hash_memory_cost: 1024\n  hash_parallelism: 1\n"
    "pipeline:\n  steps:\n"
    + "".join(f"    - name: {step.name}\n      max_attempts: 1\n" for step in DEFAULT_STEPS)
)
NO_UPLOAD_LIMIT = {"STOX_MAX_UPLOADS_PER_USER": "0"}

RIGHT, NONE, FORGED = "right", "none", "forged"
# mostly the right token for the operation's role, the others now and then: 401/403 must
# conform too
CREDENTIALS = st.sampled_from([RIGHT] * 5 + [USER, ADMIN, SERVICE, NONE, FORGED])
ADMITS = {USER: {USER, ADMIN}, SERVICE: {SERVICE}}


@dataclass
class Failure:
    operation: str
    title: str
    message: str
    reproduce: str


@dataclass
class Tally:
    """Examples and answers by operation, and the distinct failures (the first of each)."""

    examples: Counter[str] = field(default_factory=Counter)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)
    failed: int = 0  # examples that failed a check
    scenarios: int = 0  # stateful runs only
    restarts: int = 0  # stateful runs Hypothesis stopped as flaky (see fuzz_stateful)

    @property
    def total(self) -> int:
        return sum(self.examples.values())

    def check(self, case: Case[Any], response: Response, validate: Callable[[], None]) -> None:
        """Count the example and its answer; run `validate`, keeping what it finds."""
        label = case.operation.label
        self.examples[label] += 1
        self.statuses[label][response.status_code] += 1
        try:
            validate()
        except* AssertionError as group:
            self.failed += 1
            for exc in _leaves(group):
                title = str(getattr(exc, "title", type(exc).__name__))
                message = str(getattr(exc, "message", exc))
                key = (label, title)
                if key not in self.failures:
                    curl = case.as_curl_command(headers=dict(response.request.headers))
                    self.failures[key] = Failure(label, title, message, curl)

    def report(self, heading: str) -> str:
        width = max((len(label) for label in self.examples), default=10)
        lines = [heading, f"  {'operation':<{width}}  {'examples':>8}  answers"]
        for label, count in self.examples.items():
            answers = " ".join(f"{s}:{n}" for s, n in sorted(self.statuses[label].items()))
            lines.append(f"  {label:<{width}}  {count:>8}  {answers}")
        lines.append(
            f"  {'total':<{width}}  {self.total:>8}  failures: {len(self.failures)} distinct, "
            f"in {self.failed} examples"
        )
        if self.scenarios:
            lines.append(f"  {self.scenarios} scenarios, {self.restarts} restarts")
        for failure in self.failures.values():
            lines += [
                f"  FAILED {failure.operation}: {failure.title}",
                *(f"    {line}" for line in failure.message.splitlines()),
                f"    {failure.reproduce}",
            ]
        return "\n".join(lines)


def _leaves(group: BaseExceptionGroup[AssertionError]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


class AuthNotConforming(AssertionError):
    """An answer that admits or refuses a token otherwise than the operation's role says."""

    title = "Authentication not as documented"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def check_auth(role: str | None, sent: str, status: int) -> None:
    """The document's `security` and `x-required-role`, as answered for the token `sent` (its
    kind, `Tokens.kind_of`): a token of an admitted role is not refused (401/403), none or a
    forged one gets 401, another role's 403. A body over the limit is refused (413) before
    anyone is asked for a token."""
    if role is None or status == 413:
        return
    if sent in ADMITS[role]:
        if status in (401, 403):
            raise AuthNotConforming(f"a {role} operation refused a {sent} token: {status}")
        return
    expected = 401 if sent in (NONE, FORGED) else 403
    if status != expected:
        raise AuthNotConforming(f"{sent} token for a {role} operation: {status}, not {expected}")


class Tokens:
    """The tokens a fuzzed request may carry, and which kind a sent one is."""

    def __init__(self, gw: RunningGateway) -> None:
        self.by_kind = {
            USER: gw.token("alice"),
            ADMIN: gw.token("root", ADMIN),
            SERVICE: gw.service_token(),
            FORGED: TokenAuthority("another-secret-" + "y" * 32).issue("alice", "alice", USER),
        }
        self.kinds = {token: kind for kind, token in self.by_kind.items()}

    def headers(self, role: str | None, kind: str = RIGHT) -> dict[str, str]:
        """An Authorization header of `kind` (RIGHT: the role's own) for an operation."""
        if kind == RIGHT:
            kind = role or NONE
        token = self.by_kind.get(kind)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def kind_of(self, response: Response) -> str:
        """The kind of token the request carried (Schemathesis may drop or replace the
        header: what counts is what was sent); one this module did not issue is FORGED."""
        sent = bearer.from_authorization(response.request.headers.get("Authorization"))
        return NONE if sent is None else self.kinds.get(sent, FORGED)


def role_of(case: Case[Any]) -> str | None:
    role = case.operation.definition.raw.get("x-required-role")
    return str(role) if role else None


def load(gw: RunningGateway) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(gw.base_url + DOCUMENT, wait_for_schema=20)


def operations(schema: schemathesis.BaseSchema) -> list[Any]:
    """Every operation of the document, from its paths (including the document's own)."""
    raw: dict[str, Any] = schema.raw_schema
    return [schema[path][method] for path, methods in raw["paths"].items() for method in methods]


def _settings(examples: int, **extra: Any) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        **extra,
    )


def fuzz_operation(operation: Any, tokens: Tokens, examples: int, tally: Tally) -> None:
    """Up to `examples` valid requests to `operation`, and as many invalid ones if it takes
    input (Hypothesis stops sooner when it has tried every request there is)."""
    modes = [GenerationMode.POSITIVE]
    if operation.body or any(True for _ in operation.iter_parameters()):
        modes.append(GenerationMode.NEGATIVE)
    for mode in modes:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode), kind=CREDENTIALS)
        @_settings(examples)
        def run(case: Case[Any], kind: str) -> None:
            role = role_of(case)
            response = case.call(headers=tokens.headers(role, kind), timeout=30)

            def validate() -> None:
                case.validate_response(response, checks=CHECKS)
                check_auth(role, tokens.kind_of(response), response.status_code)

            tally.check(case, response, validate)

        run()


def fuzz_operations(gw: RunningGateway, examples: int) -> Tally:
    tally = Tally()
    schema = load(gw)
    tokens = Tokens(gw)
    for operation in operations(schema):
        fuzz_operation(operation, tokens, examples, tally)
    return tally


def fuzz_stateful(gw: RunningGateway, scenarios: int, steps: int = 10) -> Tally:
    """`scenarios` sequences of up to `steps` calls along the document's links, each call with
    the token its role needs (one user owns every workflow, so its links lead somewhere).

    Which rules a scenario can take depends on the server's answers, which are not the same
    when Hypothesis replays a scenario's choices: it then stops the run as Flaky. That is not
    a failed check (Schemathesis's own runner starts again too): the run goes on with the
    scenarios left, a new machine, as long as each run makes progress.
    """
    tally = Tally()
    tokens = Tokens(gw)

    class Workflows(load(gw).as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            tally.scenarios += 1

        def before_call(self, case: Case[Any]) -> None:
            case.headers.update(tokens.headers(role_of(case)))

        def validate_response(
            self,
            response: Response,
            case: Case[Any],
            additional_checks: list[CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            def validate() -> None:
                case.validate_response(response, checks=CHECKS)
                check_auth(role_of(case), tokens.kind_of(response), response.status_code)

            tally.check(case, response, validate)

    while tally.scenarios < scenarios:
        before = tally.scenarios
        try:
            Workflows.run(settings=_settings(scenarios - before, stateful_step_count=steps))
        except hypothesis.errors.Flaky:
            tally.restarts += 1
            if tally.scenarios == before:
                raise
        else:
            break
    return tally


@contextmanager
def fuzz_gateway(log_dir: Path) -> Iterator[RunningGateway]:
    """`server.py` on a free port (see the module's docstring for its settings)."""
    port = free_port()
    storage = f"sqlite:///{log_dir}/stox.db"
    config = procs.gateway_config(port, "fuzz", storage, SETTINGS_YAML)
    proc = procs.start_gateway(log_dir, "fuzz-gateway", config, **NO_UPLOAD_LIMIT)
    try:
        asyncio.run(procs.wait_ready(proc, port))
        yield procs.remote(port)
    finally:
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--examples", type=int, default=500, help="most examples per operation and mode"
    )
    parser.add_argument("--scenarios", type=int, default=500, help="stateful scenarios")
    parser.add_argument("--steps", type=int, default=10, help="most calls per scenario")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, fuzz_gateway(Path(folder)) as gw:
        started = time.monotonic()
        operations_tally = fuzz_operations(gw, args.examples)
        print(operations_tally.report(f"operations (at most {args.examples} per mode):"))
        print(f"  {time.monotonic() - started:.0f} s", flush=True)
        started = time.monotonic()
        stateful = fuzz_stateful(gw, args.scenarios, args.steps)
        print(stateful.report(f"stateful ({args.scenarios} scenarios, ≤{args.steps} calls):"))
        print(f"  {time.monotonic() - started:.0f} s")
    total = operations_tally.total + stateful.total
    failures = len(operations_tally.failures) + len(stateful.failures)
    print(f"all: {total} examples, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
