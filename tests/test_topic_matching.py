"""Table tests of `topic_matches`: AMQP topic binding keys against routing keys.

The expected answers are RabbitMQ's (`rabbit_db_topic_exchange`): words are split on `.`,
`*` is exactly one word (which may be empty, as in `a..b`), `#` is zero or more words.
"""

from __future__ import annotations

import pytest

from stox.bus.base import topic_matches

CASES: list[tuple[str, str, bool]] = [
    # exact keys
    ("step.image", "step.image", True),
    ("step.image", "step.seo", False),
    ("step.image", "step", False),
    ("step.image", "step.image.retry", False),
    ("step.image", "Step.image", False),  # case matters
    ("step.image", "step.images", False),  # whole words, not prefixes
    # `#` alone matches everything, including one word and the empty key
    ("#", "step", True),
    ("#", "step.image", True),
    ("#", "a.b.c.d.e", True),
    ("#", "", True),
    ("#.#", "a", True),
    # `a.#`: the word a, then zero or more words
    ("workflow.#", "workflow", True),
    ("workflow.#", "workflow.completed", True),
    ("workflow.#", "workflow.step.image.failed", True),
    ("workflow.#", "workflows", False),
    ("workflow.#", "step.workflow", False),
    ("workflow.#", "", False),
    # `#.b`: zero or more words, then b
    ("#.failed", "failed", True),
    ("#.failed", "workflow.failed", True),
    ("#.failed", "step.image.failed", True),
    ("#.failed", "workflow.failed.again", False),
    ("#.failed", "unfailed", False),
    # `a.*.c`: exactly one word in the middle
    ("step.*.done", "step.image.done", True),
    ("step.*.done", "step.done", False),
    ("step.*.done", "step.image.seo.done", False),
    ("step.*.done", "step.image.done.x", False),
    ("*", "step", True),
    ("*", "step.image", False),
    ("*.*", "step", False),
    ("*.*", "step.image", True),
    ("step.*", "step", False),
    ("*.image", "step.image", True),
    # empty words: `a..b` has an empty middle word, which `*` and `#` both match
    ("a.*.b", "a..b", True),
    ("a..b", "a..b", True),
    ("a.b", "a..b", False),
    ("*.b", ".b", True),
    ("a.*", "a.", True),
    ("a.*", "a", False),
    ("a.#.b", "a..b", True),
    # `a.#.c` with zero, one and several words in between
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.b.c", True),
    ("a.#.c", "a.b1.b2.b3.c", True),
    ("a.#.c", "a.b", False),
    ("a.#.c", "a.c.d", False),
    ("a.#.c", "x.a.c", False),
    ("a.#.c", "a.b.c.c", True),  # `#` may swallow an earlier c
    # `*` and `#` together
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("#.*", "a", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("step.*.#", "step", False),
    ("step.*.#", "step.image", True),
    ("step.*.#", "step.image.a.b", True),
    ("#.step.#", "x.step.y", True),
    ("#.step.#", "step", True),
    ("#.step.#", "steps", False),
    # the empty binding key matches only the empty routing key
    ("", "", True),
    ("", "a", False),
]


@pytest.mark.parametrize(
    ("pattern", "routing_key", "expected"),
    CASES,
    ids=[f"{p or '<empty>'} ~ {k or '<empty>'}" for p, k, _ in CASES],
)
def test_topic_matches(pattern: str, routing_key: str, expected: bool) -> None:
    assert topic_matches(pattern, routing_key) is expected


@pytest.mark.parametrize("pattern", ["*", "#.*"])
def test_star_does_not_match_the_empty_routing_key(pattern: str) -> None:
    assert topic_matches(pattern, "") is False
