"""The part of PromQL that docs/grafana-dashboard.json uses, evaluated over Prometheus text scrapes.

scripts/render_dashboard.py draws the dashboard from a series of scrapes of a real gateway, as
Grafana would draw it from a Prometheus that scraped it. This module is that Prometheus: it
stores the scrapes (adding the target labels Prometheus adds, such as `instance`) and evaluates
the dashboard's expressions at each scrape's time, following Prometheus's own rules where they
decide the numbers (rate's extrapolation and counter resets, histogram_quantile's interpolation,
a series being absent from the last scrape, label matching of binary operators). Anything
outside the subset (another function, `offset`, `on(...)`, a subquery…) raises PromQLError
rather than being approximated.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, __name__ included for raw series
Vector = dict[Labels, float]
Value = Vector | float  # an instant vector or a scalar


class PromQLError(ValueError):
    """An expression this evaluator does not implement, or that is not valid PromQL."""


# -- storage ------------------------------------------------------------------------------------


class Scrapes:
    """The samples of successive scrapes, by series."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        self.names: dict[str, set[Labels]] = defaultdict(set)  # each metric name's series

    def add(self, at: float, text: str, target: Mapping[str, str]) -> None:
        """One scrape's exposition `text`, taken at `at`; `target` labels go on every series."""
        if self.times and at <= self.times[-1]:
            raise ValueError("scrapes must be added in time order")
        self.times.append(at)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = _key({"__name__": sample.name, **sample.labels, **target})
                self.series[key].append((at, float(sample.value)))
                self.names[sample.name].add(key)


def _key(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted((k, v) for k, v in labels.items() if v != ""))


# -- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str  # = != =~ !~
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.label, "")
        if self.op in ("=", "!="):
            return (actual == self.value) == (self.op == "=")
        return (re.fullmatch(self.value, actual) is not None) == (self.op == "=~")


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[Matcher, ...]
    window: float | None  # seconds, for a range selector


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Aggregate:
    op: str
    by: tuple[str, ...]
    expr: Node


@dataclass(frozen=True)
class Binary:
    op: str
    lhs: Node
    rhs: Node


Node = Selector | Number | Call | Aggregate | Binary

AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "sum": lambda values: float(sum(values)),
    "max": max,
    "min": min,
}
FUNCTIONS = {"rate", "histogram_quantile", "vector"}
PRECEDENCE = {"or": 1, "+": 2, "-": 2, "*": 3, "/": 3}
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![a-zA-Z_]))
    | (?P<duration>\[\d+(?:ms|s|m|h|d)\])
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<op>=~|!~|!=|[-+*/(){},=])
    )""",
    re.VERBOSE,
)


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Grafana's step: `$name` and `${name}` replaced by `variables`; an unknown one raises."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise PromQLError(f"no value for the dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            raise PromQLError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = _tokens(expr)
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, text: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (text is not None and token[1] != text):
            raise PromQLError(f"expected {text or 'more'} at token {self.pos} of {self.expr!r}")
        self.pos += 1
        return token

    def parse(self) -> Node:
        node = self.binary(1)
        if self.peek() is not None:
            raise PromQLError(f"unexpected {self.peek()} in {self.expr!r}")
        return node

    def binary(self, min_precedence: int) -> Node:
        lhs = self.unary()
        while (token := self.peek()) is not None and PRECEDENCE.get(token[1], 0) >= min_precedence:
            op = self.take()[1]
            if (after := self.peek()) is not None and after[1] in ("on", "ignoring", "bool"):
                raise PromQLError(f"{after[1]} is not implemented ({self.expr!r})")
            rhs = self.binary(PRECEDENCE[op] + 1)  # left-associative
            lhs = Binary(op, lhs, rhs)
        return lhs

    def unary(self) -> Node:
        kind, text = self.take()
        if kind == "number":
            return Number(float(text))
        if text == "(":
            node = self.binary(1)
            self.take(")")
            return node
        if kind != "name":
            raise PromQLError(f"unexpected {text!r} in {self.expr!r}")
        nxt = self.peek()
        if text in AGGREGATIONS:
            by: tuple[str, ...] = ()
            if nxt is not None and nxt[1] == "by":
                self.take()
                by = self.names()
            elif nxt is not None and nxt[1] == "without":
                raise PromQLError(f"without is not implemented ({self.expr!r})")
            self.take("(")
            expr = self.binary(1)
            self.take(")")
            return Aggregate(text, by, expr)
        if nxt is not None and nxt[1] == "(":
            if text not in FUNCTIONS:
                raise PromQLError(f"the function {text}() is not implemented ({self.expr!r})")
            self.take("(")
            args = [self.binary(1)]
            while (token := self.peek()) is not None and token[1] == ",":
                self.take()
                args.append(self.binary(1))
            self.take(")")
            return Call(text, tuple(args))
        return self.selector(text)

    def names(self) -> tuple[str, ...]:
        self.take("(")
        names = [self.take()[1]]
        while (separator := self.take()[1]) != ")":
            if separator != ",":
                raise PromQLError(f"expected , or ) in a by clause of {self.expr!r}")
            names.append(self.take()[1])
        return tuple(names)

    def selector(self, name: str) -> Selector:
        matchers: list[Matcher] = []
        if (token := self.peek()) is not None and token[1] == "{":
            self.take()
            while True:
                label = self.take()[1]
                op = self.take()[1]
                kind, quoted = self.take()
                if op not in ("=", "!=", "=~", "!~") or kind != "string":
                    raise PromQLError(f"bad matcher for {label} in {self.expr!r}")
                matchers.append(Matcher(label, op, _unquote(quoted)))
                if self.take()[1] == "}":
                    break
        window = None
        if (token := self.peek()) is not None and token[0] == "duration":
            self.take()
            window = parse_duration(token[1][1:-1])
        if (token := self.peek()) is not None and token[1] in ("offset", "@"):
            raise PromQLError(f"{token[1]} is not implemented ({self.expr!r})")
        return Selector(name, tuple(matchers), window)


def _unquote(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    if match is None:
        raise PromQLError(f"not a duration: {text!r}")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def parse(expr: str) -> Node:
    """The expression's tree (variables already substituted); PromQLError outside the subset."""
    return _Parser(expr).parse()


def selectors(node: Node) -> Iterator[Selector]:
    """Each selector in the tree."""
    if isinstance(node, Selector):
        yield node
    elif isinstance(node, Call):
        for arg in node.args:
            yield from selectors(arg)
    elif isinstance(node, Aggregate):
        yield from selectors(node.expr)
    elif isinstance(node, Binary):
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)


# -- evaluation ---------------------------------------------------------------------------------


class Evaluator:
    """Evaluates a parsed expression at a time, over `scrapes`."""

    def __init__(self, scrapes: Scrapes) -> None:
        self.scrapes = scrapes

    def at(self, node: Node, t: float) -> Value:
        if isinstance(node, Number):
            return node.value
        if isinstance(node, Selector):
            if node.window is not None:
                raise PromQLError("a range selector outside rate() is not implemented")
            return self.instant(node, t)
        if isinstance(node, Aggregate):
            return aggregate(node.op, node.by, self.vector(node.expr, t))
        if isinstance(node, Binary):
            return binary(node.op, self.at(node.lhs, t), self.at(node.rhs, t))
        return self.call(node, t)

    def vector(self, node: Node, t: float) -> Vector:
        value = self.at(node, t)
        if not isinstance(value, dict):
            raise PromQLError(f"expected an instant vector, got the scalar {value}")
        return value

    def call(self, node: Call, t: float) -> Value:
        args = node.args
        if node.function == "rate":
            if len(args) != 1 or not isinstance(args[0], Selector) or args[0].window is None:
                raise PromQLError("rate() takes one range selector")
            return self.rate(args[0], t)
        if node.function == "histogram_quantile":
            if len(args) != 2 or not isinstance(args[0], Number):
                raise PromQLError("histogram_quantile() takes a number and a vector")
            return histogram_quantile(args[0].value, self.vector(args[1], t))
        if len(args) != 1 or not isinstance(args[0], Number):  # vector(s)
            raise PromQLError("vector() takes a number")
        return {(): args[0].value}

    def matching(self, selector: Selector) -> Iterator[tuple[Labels, list[tuple[float, float]]]]:
        for labels in self.scrapes.names.get(selector.name, ()):
            as_dict = dict(labels)
            if all(m.matches(as_dict) for m in selector.matchers):
                yield labels, self.scrapes.series[labels]

    def instant(self, selector: Selector, t: float) -> Vector:
        """Each matching series' value in the last scrape at or before `t`; a series absent
        from that scrape is stale, as Prometheus marks it."""
        last_scrape = max((at for at in self.scrapes.times if at <= t), default=None)
        result: Vector = {}
        for labels, samples in self.matching(selector):
            latest = next(((at, v) for at, v in reversed(samples) if at <= t), None)
            if latest is not None and latest[0] == last_scrape:
                result[labels] = latest[1]
        return result

    def rate(self, selector: Selector, t: float) -> Vector:
        assert selector.window is not None
        result: Vector = {}
        for labels, samples in self.matching(selector):
            inside = [(at, v) for at, v in samples if t - selector.window < at <= t]
            value = extrapolated_rate(inside, t - selector.window, t)
            if value is not None:
                result[_without_name(labels)] = value
        return result

    def over(self, node: Node, times: Iterable[float]) -> dict[Labels, list[tuple[float, float]]]:
        """The expression at each of `times`: each output series' points."""
        series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for t in times:
            value = self.at(node, t)
            for labels, v in (value if isinstance(value, dict) else {(): value}).items():
                series[labels].append((t, v))
        return dict(series)


def _without_name(labels: Labels) -> Labels:
    return tuple((k, v) for k, v in labels if k != "__name__")


def extrapolated_rate(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Prometheus's rate(): the increase (counter resets added back) between the first and last
    sample in the window, extrapolated towards the window's edges (by at most half an average
    interval past 1.1 of one, and not below zero), per second. None under two samples."""
    if len(samples) < 2:
        return None
    first_t, first = samples[0]
    last_t, last = samples[-1]
    increase = last - first
    for (_, before), (_, after) in itertools.pairwise(samples):
        if after < before:
            increase += before
    sampled = last_t - first_t
    average = sampled / (len(samples) - 1)
    to_start, to_end = first_t - start, end - last_t
    if increase > 0 and first >= 0:
        to_start = min(to_start, sampled * (first / increase))
    threshold = average * 1.1
    if to_start >= threshold:
        to_start = average / 2
    if to_end >= threshold:
        to_end = average / 2
    return increase * ((sampled + to_start + to_end) / sampled) / (end - start)


def aggregate(op: str, by: tuple[str, ...], vector: Vector) -> Vector:
    groups: dict[Labels, list[float]] = defaultdict(list)
    for labels, value in vector.items():
        as_dict = dict(labels)
        groups[_key({name: as_dict.get(name, "") for name in by})].append(value)
    return {labels: AGGREGATIONS[op](values) for labels, values in groups.items()}


def binary(op: str, lhs: Value, rhs: Value) -> Value:
    """Arithmetic between scalars and vectors (one-to-one matching on all labels but the name),
    and `or` between vectors."""
    if op == "or":
        if not isinstance(lhs, dict) or not isinstance(rhs, dict):
            raise PromQLError("or takes two vectors")
        present = {_without_name(labels) for labels in lhs}
        return lhs | {k: v for k, v in rhs.items() if _without_name(k) not in present}
    if isinstance(lhs, dict) and isinstance(rhs, dict):
        right = {_without_name(labels): value for labels, value in rhs.items()}
        return {
            _without_name(labels): _arithmetic(op, value, right[_without_name(labels)])
            for labels, value in lhs.items()
            if _without_name(labels) in right
        }
    if isinstance(lhs, dict):
        assert isinstance(rhs, float)
        return {_without_name(k): _arithmetic(op, v, rhs) for k, v in lhs.items()}
    if isinstance(rhs, dict):
        return {_without_name(k): _arithmetic(op, lhs, v) for k, v in rhs.items()}
    return _arithmetic(op, lhs, rhs)


def _arithmetic(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:  # IEEE 754, as Prometheus (Go) divides
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def histogram_quantile(q: float, vector: Vector) -> Vector:
    """Prometheus's histogram_quantile over classic buckets: for each label set but `le`, the
    q-quantile by linear interpolation within the bucket where the rank falls (the lowest
    bucket starting at 0; a rank in the +Inf bucket gives the highest finite bound)."""
    histograms: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, value in vector.items():
        as_dict = dict(labels)
        if "le" not in as_dict:
            continue
        rest = _without_name(tuple((k, v) for k, v in labels if k != "le"))
        histograms[rest].append((float(as_dict["le"]), value))
    return {labels: _bucket_quantile(q, buckets) for labels, buckets in histograms.items()}


def _bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    counts, highest = [], 0.0
    for _, count in buckets:  # rates of cumulative buckets can come out a hair non-monotonic
        highest = max(highest, count)
        counts.append(highest)
    observations = counts[-1]
    if observations == 0 or math.isnan(observations):
        return math.nan
    rank = q * observations
    b = next(i for i, count in enumerate(counts) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], counts[b]
    if b > 0:
        start = buckets[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)
