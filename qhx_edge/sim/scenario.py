"""Scenario files: a deployment and the network that will fail it (docs/simulation.md; issue 12).

A scenario is a TOML file (``scenarios/*.toml``)::

    [scenario]
    name = "courier-coalition"
    duration = "72h"            # simulated time
    seed = 7                    # every random choice (Markov links) comes from it
    sample = "5m"               # how often staleness and modes are sampled for the report

    [[domain]]
    name = "alpha.example"
    authority = "alpha-hq"      # the node the authority publishes at
    freshness_every = "1h"      # the authority signs a freshness epoch this often (while not out)
    staleness = { soft = "6h", hard = "72h" }
    outages = [["10h", "20h"]]  # the authority publishes nothing in these windows

    [[node]]
    name = "a1"
    domain = "alpha.example"
    clock_skew = "0s"           # how far the node's clock runs ahead (negative: behind)
    requests_per_hour = 120     # SVID requests its workloads make, spread evenly (the report counts refusals)

    [[link]]
    between = ["alpha-hq", "a1"]
    bandwidth = "9600bit/s"     # or "1Mbit/s", "250kB/s"
    latency = "200ms"
    windows = [["0h", "2h"], ["6h", "8h"]]    # up in these windows; or
    markov = { up = "20m", down = "40m" }     # up and down for exponential times with these means
    detect = "carrier"          # the nodes see the link come up (serve redials on it); or "retry": they
                                # learn it by dialling, with serve's backoff (5 s doubling to 300 s)

    [[courier]]
    name = "jeep"
    stops = [["a1", "2h"], ["b1", "14h"]]     # carries a pack from each stop to the next

    [[agreement]]
    between = ["alpha.example", "beta.example"]   # the proposer first
    at = "0h"
    release = ["bundle", "freshness", "revocation"]   # what each side releases to the other
    max_staleness = "24h"

    [[event]]
    at = "30h"
    kind = "revoke-node"        # rotate-ca | revoke-node | publish-policy | terminate-agreement (+ partner)
                                # | restart (the node's process: its links drop, its store stays)
    domain = "alpha.example"
    node = "a3"

    [[adversary]]
    kind = "replay"             # replay | forge | withhold-revocations
    node = "b1"
    at = "40h"

A bad file is refused with ``malformed`` and a message that names the file, the line and the key.
Times are integer milliseconds from the start of the scenario.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from qhx_edge.core.errors import Malformed
from qhx_edge.core.spiffe import check_trust_domain

MAX_SCENARIO_FILE = 4 << 20
MAX_NODES = 100_000
MAX_ITEMS = 1_000_000
MAX_DURATION_MS = 365 * 86_400_000
EVENT_KINDS = ("rotate-ca", "revoke-node", "publish-policy", "terminate-agreement", "restart")
RELEASES = ("bundle", "freshness", "revocation", "policy")  # what an agreement may release (core.documents)
ADVERSARY_KINDS = ("replay", "forge", "withhold-revocations")
_TIME = re.compile(
    r"\s*(-?)((?:[0-9]{1,12}(?:\.[0-9]{1,3})?(?:ms|s|m|h|d|w))+|[0-9]{1,12}(?:\.[0-9]{1,3})?)\s*", re.ASCII
)
_PART = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,3})?)(ms|s|m|h|d|w)?", re.ASCII)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_RATE = re.compile(r"\s*([0-9]{1,12}(?:\.[0-9]{1,6})?)\s*([kMG]?)(bit|B)/s\s*", re.ASCII)
_PREFIX = {"": 1, "k": 1_000, "M": 1_000_000, "G": 1_000_000_000}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_HEADER = re.compile(r"^\s*\[\[?\s*[A-Za-z0-9_.\"-]+\s*\]\]?\s*(#.*)?$", re.ASCII)
# What a run may generate, whatever the file says: the engine pre-computes contacts and samples.
MAX_SAMPLES = 100_000
MIN_MARKOV_MEAN = 1_000  # ms
DETECT = ("carrier", "retry")  # how a link's nodes learn it is up (the module docstring)
MIN_FRESHNESS_EVERY = 60_000  # ms
MAX_CONTACT_WINDOWS = 2_000_000


@dataclass(frozen=True)
class Domain:
    name: str
    authority: str
    freshness_every: int
    soft: int
    hard: int
    outages: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Node:
    name: str
    domain: str
    clock_skew: int = 0
    requests_per_hour: float = 0.0  # SVID requests its workloads make (the report counts those refused)


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    bandwidth: float  # bytes per second
    latency: int
    windows: tuple[tuple[int, int], ...] = ()
    markov: tuple[int, int] | None = None  # mean up, mean down
    detect: str = "carrier"  # carrier | retry (module docstring)


@dataclass(frozen=True)
class Courier:
    name: str
    stops: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Event:
    at: int
    kind: str
    domain: str
    node: str | None = None
    partner: str | None = None  # terminate-agreement: the other domain


@dataclass(frozen=True)
class AgreementSpec:
    """A coalition federation between two domains from ``at``: each side releases ``release`` to the
    other and accepts its whole trust domain; ``max_staleness`` caps each side's budget for the other."""

    a: str  # the proposer
    b: str
    at: int = 0
    release: tuple[str, ...] = ("bundle", "freshness", "revocation")
    max_staleness: int = 86_400_000


@dataclass(frozen=True)
class Adversary:
    kind: str
    node: str
    at: int
    until: int | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    duration: int
    seed: int
    sample: int
    domains: tuple[Domain, ...]
    nodes: tuple[Node, ...]
    links: tuple[Link, ...] = ()
    couriers: tuple[Courier, ...] = ()
    events: tuple[Event, ...] = ()
    adversaries: tuple[Adversary, ...] = ()
    agreements: tuple[AgreementSpec, ...] = ()
    source: str = field(default="", compare=False)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


class _Where:
    """Finds the line of a key in the TOML text, for messages a user can act on."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def line(self, table: str, index: int | None, key: str | None) -> int | None:
        header = re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]" if index is not None else
                            rf"^\s*\[\s*{re.escape(table)}\s*\]")  # fmt: skip
        seen, start = -1, None
        for i, text in enumerate(self.lines):
            if header.match(text):
                seen += 1
                if index is None or seen == index:
                    start = i
                    break
        if start is None:
            return None
        if key is None:
            return start + 1
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start + 1, len(self.lines)):
            if _HEADER.match(self.lines[i]):  # the next table, not an array's continuation line
                break
            if pattern.match(self.lines[i]):
                return i + 1
        return start + 1

    def fail(self, table: str, index: int | None, key: str | None, message: str) -> Malformed:
        line = self.line(table, index, key)
        name = f"{table}[{index}]" if index is not None else table
        what = f"{name}.{key}" if key else name
        at = f"{self.source}:{line}" if line else self.source
        return Malformed(f"{at}: {what}: {message}")


def time_ms(value: Any) -> int:
    """Milliseconds from ``"90ms"``, ``"2.5s"``, ``"30m"``, ``"6h"``, ``"5h45m"``, ``"3d"`` or a number of seconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        ms = value * 1000
    elif isinstance(value, str) and (m := _TIME.fullmatch(value)):
        total = sum(Fraction(n) * _UNIT_MS[u or "s"] for n, u in _PART.findall(m.group(2)))
        ms = int(-total if m.group(1) else total)
    else:
        raise ValueError(f"{value!r} is not a time (examples: '200ms', '45s', '30m', '6h', '3d')")
    if abs(ms) > MAX_DURATION_MS:
        raise ValueError(f"{value!r} is longer than a year")
    return ms


def rate(value: Any) -> float:
    """Bytes per second from ``"9600bit/s"``, ``"1Mbit/s"``, ``"250kB/s"``."""
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a rate (examples: '9600bit/s', '1Mbit/s', '250kB/s')")
    n = float(m.group(1)) * _PREFIX[m.group(2)]
    out = n / 8 if m.group(3) == "bit" else n
    if out <= 0:
        raise ValueError("a rate must be positive")
    return out


def load(text: str, source: str = "<scenario>") -> Scenario:
    """Parse and check a scenario; ``malformed`` naming the file, line and key of the first fault."""
    if len(text) > MAX_SCENARIO_FILE:
        raise Malformed(f"{source}: a scenario file is at most {MAX_SCENARIO_FILE} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Malformed(f"{source}: {exc}") from exc
    w = _Where(text, source)
    unknown = set(data) - {"scenario", "domain", "node", "cluster", "link", "courier", "event", "adversary",
                           "agreement"}  # fmt: skip
    if unknown:
        raise Malformed(f"{source}: unknown sections {sorted(unknown)}")

    def table(name: str) -> dict[str, Any]:
        value = data.get(name)
        if not isinstance(value, dict):
            raise w.fail(name, None, None, "is a table ([scenario]) and is required")
        return value

    def tables(name: str) -> list[dict[str, Any]]:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
            raise w.fail(name, None, None, f"is an array of tables ([[{name}]])")
        if len(value) > MAX_NODES:
            raise w.fail(name, None, None, f"at most {MAX_NODES} entries")
        return value

    def get(item: dict[str, Any], name: str, index: int | None, key: str, convert: Any, default: Any = ...) -> Any:
        if key not in item:
            if default is ...:
                raise w.fail(name, index, None, f"'{key}' is required")
            return default
        try:
            return convert(item[key])
        except (ValueError, TypeError, Malformed) as exc:
            raise w.fail(name, index, key, getattr(exc, "message", str(exc))) from exc

    def only(item: dict[str, Any], name: str, index: int | None, keys: set[str]) -> None:
        extra = sorted(set(item) - keys)
        if extra:
            raise w.fail(name, index, extra[0], f"unknown key (known: {', '.join(sorted(keys))})")

    def windows(value: Any) -> tuple[tuple[int, int], ...]:
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            raise ValueError("a list of [start, end] windows")
        out = []
        for pair in value:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("each window is [start, end]")
            a, b = time_ms(pair[0]), time_ms(pair[1])
            if not 0 <= a < b:
                raise ValueError(f"a window must start at or after 0 and end after it starts: {pair}")
            out.append((a, b))
        out.sort()
        for (_, e1), (s2, _) in itertools.pairwise(out):
            if s2 < e1:
                raise ValueError("windows overlap")
        return tuple(out)

    def name_of(value: Any) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise ValueError("a name of letters, digits, '.', '_' and '-' (at most 64)")
        return value

    def positive_int(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("a non-negative integer")
        return value

    top = table("scenario")
    only(top, "scenario", None, {"name", "duration", "seed", "sample"})
    duration = get(top, "scenario", None, "duration", time_ms)
    if duration <= 0:
        raise w.fail("scenario", None, "duration", "must be positive")
    sample = get(top, "scenario", None, "sample", time_ms, 300_000)
    if sample <= 0 or duration // sample > MAX_SAMPLES:
        raise w.fail("scenario", None, "sample", f"positive, and at most {MAX_SAMPLES} samples in the duration")

    domains = []
    for i, d in enumerate(tables("domain")):
        only(d, "domain", i, {"name", "authority", "freshness_every", "staleness", "outages"})
        stale = get(
            d, "domain", i, "staleness", lambda v: v if isinstance(v, dict) else _bad("a table { soft, hard }"), {}
        )
        if set(stale) - {"soft", "hard"}:
            raise w.fail("domain", i, "staleness", "has only soft and hard")
        try:
            soft, hard = time_ms(stale.get("soft", "6h")), time_ms(stale.get("hard", "72h"))
        except ValueError as exc:
            raise w.fail("domain", i, "staleness", str(exc)) from exc
        if not 0 < soft < hard:
            raise w.fail("domain", i, "staleness", "0 < soft < hard")
        domains.append(Domain(
            get(d, "domain", i, "name", check_trust_domain), get(d, "domain", i, "authority", name_of),
            get(d, "domain", i, "freshness_every", time_ms, 3_600_000), soft, hard,
            get(d, "domain", i, "outages", windows, ()),
        ))  # fmt: skip
        if domains[-1].freshness_every < MIN_FRESHNESS_EVERY:
            raise w.fail("domain", i, "freshness_every", "at least a minute")
    if not domains:
        raise w.fail("domain", None, None, "at least one [[domain]]")
    by_domain = {d.name for d in domains}
    if len(by_domain) != len(domains):
        raise Malformed(f"{source}: two domains share a name")

    nodes = []
    for i, n in enumerate(tables("node")):
        only(n, "node", i, {"name", "domain", "clock_skew", "requests_per_hour"})
        dom = get(n, "node", i, "domain", str)
        if dom not in by_domain:
            raise w.fail("node", i, "domain", f"no [[domain]] named {dom!r}")
        per_hour = get(n, "node", i, "requests_per_hour", requests, 0.0)
        nodes.append(
            Node(get(n, "node", i, "name", name_of), dom, get(n, "node", i, "clock_skew", time_ms, 0), per_hour)
        )
    # Clusters: many nodes at once, hung as a tree (``fanout`` children each) from a node declared above,
    # every tree link with the same parameters and windows, each level's windows later by ``stagger``.
    cluster_links: list[Link] = []
    for i, c in enumerate(tables("cluster")):
        only(c, "cluster", i, {"prefix", "count", "domain", "root", "fanout", "bandwidth", "latency", "windows",
                                "stagger", "detect"})  # fmt: skip
        detect = get(c, "cluster", i, "detect", str, "carrier")
        if detect not in DETECT:
            raise w.fail("cluster", i, "detect", f"is one of {', '.join(DETECT)}")
        dom = get(c, "cluster", i, "domain", str)
        if dom not in by_domain:
            raise w.fail("cluster", i, "domain", f"no [[domain]] named {dom!r}")
        prefix = get(c, "cluster", i, "prefix", name_of)
        count = get(c, "cluster", i, "count", positive_int)
        if not 1 <= count <= MAX_NODES or len(nodes) + count > MAX_NODES:
            raise w.fail("cluster", i, "count", f"1 to {MAX_NODES} nodes in all")
        root = get(c, "cluster", i, "root", str)
        if root not in {n.name for n in nodes}:
            raise w.fail("cluster", i, "root", f"no [[node]] named {root!r} (declare the root as a [[node]])")
        fanout = get(c, "cluster", i, "fanout", positive_int, 8)
        if fanout < 1:
            raise w.fail("cluster", i, "fanout", "at least 1")
        bandwidth, latency = get(c, "cluster", i, "bandwidth", rate), get(c, "cluster", i, "latency", time_ms, 0)
        base, stagger = get(c, "cluster", i, "windows", windows), get(c, "cluster", i, "stagger", time_ms, 0)
        if latency < 0 or stagger < 0:
            raise w.fail("cluster", i, "latency" if latency < 0 else "stagger", "must not be negative")
        members = [f"{prefix}{k}" for k in range(count)]
        nodes += [Node(m, dom) for m in members]
        for k, member in enumerate(members):
            parent, depth, above = (root, 0, -1) if k < fanout else (members[k // fanout - 1], 0, k // fanout - 1)
            while above >= 0:
                depth += 1
                above = -1 if above < fanout else above // fanout - 1
            shift = depth * stagger
            cluster_links.append(
                Link(parent, member, bandwidth, latency, tuple((a + shift, b + shift) for a, b in base), None, detect)
            )
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise Malformed(f"{source}: two nodes share a name")
    known = set(names)
    home_of = {n.name: n.domain for n in nodes}
    for i, dom_ in enumerate(domains):
        if dom_.authority not in known:
            raise w.fail("domain", i, "authority", f"no [[node]] named {dom_.authority!r}")
        if home_of[dom_.authority] != dom_.name:
            raise w.fail("domain", i, "authority", f"{dom_.authority!r} is a node of {home_of[dom_.authority]}")

    def node_ref(value: Any) -> str:
        if value not in known:
            raise ValueError(f"no [[node]] named {value!r}")
        return str(value)

    links = []
    for i, item in enumerate(tables("link")):
        only(item, "link", i, {"between", "bandwidth", "latency", "windows", "markov", "detect"})
        pair = get(item, "link", i, "between", lambda v: v if isinstance(v, list) and len(v) == 2 else None)
        if pair is None:
            raise w.fail("link", i, "between", "is [node, node]")
        a, b = (get({"between": p}, "link", i, "between", node_ref) for p in pair)
        if a == b:
            raise w.fail("link", i, "between", "a link joins two different nodes")
        if ("windows" in item) == ("markov" in item):
            raise w.fail("link", i, None, "has either 'windows' or 'markov'")
        markov = None
        if "markov" in item:
            m = item["markov"]
            if not isinstance(m, dict) or set(m) != {"up", "down"}:
                raise w.fail("link", i, "markov", "is { up = MEAN, down = MEAN }")
            try:
                markov = (time_ms(m["up"]), time_ms(m["down"]))
            except ValueError as exc:
                raise w.fail("link", i, "markov", str(exc)) from exc
            if min(markov) < MIN_MARKOV_MEAN:
                raise w.fail("link", i, "markov", "means of at least a second")
        detect = get(item, "link", i, "detect", str, "carrier")
        if detect not in DETECT:
            raise w.fail("link", i, "detect", f"is one of {', '.join(DETECT)}")
        links.append(Link(a, b, get(item, "link", i, "bandwidth", rate), get(item, "link", i, "latency", time_ms, 0),
                          get(item, "link", i, "windows", windows, ()), markov, detect))  # fmt: skip
        if links[-1].latency < 0:
            raise w.fail("link", i, "latency", "must not be negative")

    links += cluster_links
    expected = sum(len(x.windows) if x.markov is None else duration // min(x.markov) + 1 for x in links)
    if expected > MAX_CONTACT_WINDOWS:
        raise Malformed(f"{source}: the links open about {expected} windows; at most {MAX_CONTACT_WINDOWS}")
    couriers = []
    for i, c in enumerate(tables("courier")):
        only(c, "courier", i, {"name", "stops"})

        def stops(value: Any) -> tuple[tuple[str, int], ...]:
            if not isinstance(value, list) or len(value) < 2 or len(value) > MAX_ITEMS:
                raise ValueError("at least two [node, time] stops")
            out = [(node_ref(s[0]), time_ms(s[1])) for s in value if isinstance(s, list) and len(s) == 2]
            if len(out) != len(value):
                raise ValueError("each stop is [node, time]")
            if any(t2 <= t1 for (_, t1), (_, t2) in itertools.pairwise(out)) or out[0][1] < 0:
                raise ValueError("stops are in increasing time from 0")
            return tuple(out)

        couriers.append(Courier(get(c, "courier", i, "name", name_of), get(c, "courier", i, "stops", stops)))

    events = []
    for i, e in enumerate(tables("event")):
        only(e, "event", i, {"at", "kind", "domain", "node", "partner"})
        kind = get(e, "event", i, "kind", lambda v: v if v in EVENT_KINDS else _bad(f"one of {EVENT_KINDS}"))
        dom = get(e, "event", i, "domain", lambda v: v if v in by_domain else _bad(f"no [[domain]] named {v!r}"))
        target = get(e, "event", i, "node", node_ref, None)
        if kind in ("revoke-node", "restart") and target is None:
            raise w.fail("event", i, None, f"a {kind} event names its 'node'")
        partner = get(e, "event", i, "partner", lambda v, home=dom: v if v in by_domain and v != home else
                      _bad("another [[domain]]"), None)  # fmt: skip
        if (kind == "terminate-agreement") != (partner is not None):
            raise w.fail("event", i, "partner", "a terminate-agreement event, and only it, names its 'partner'")
        at = get(e, "event", i, "at", time_ms)
        if not 0 <= at <= duration:
            raise w.fail("event", i, "at", "within the scenario's duration")
        events.append(Event(at, kind, dom, target, partner))

    specs: list[AgreementSpec] = []
    for i, g in enumerate(tables("agreement")):
        only(g, "agreement", i, {"between", "at", "release", "max_staleness"})

        def two_domains(value: Any) -> tuple[str, str]:
            if not (isinstance(value, list) and len(value) == 2 and all(v in by_domain for v in value)):
                raise ValueError("is [domain, domain], two declared [[domain]]s")
            if value[0] == value[1]:
                raise ValueError("an agreement joins two different domains")
            return str(value[0]), str(value[1])

        def releases(value: Any) -> tuple[str, ...]:
            if not isinstance(value, list) or not all(v in RELEASES for v in value) or len(set(value)) != len(value):
                raise ValueError(f"lists each of {', '.join(RELEASES)} at most once")
            return tuple(value)

        a, b = get(g, "agreement", i, "between", two_domains)
        if any({a, b} == {x.a, x.b} for x in specs):
            raise w.fail("agreement", i, "between", "one [[agreement]] per pair of domains")
        at = get(g, "agreement", i, "at", time_ms, 0)
        if not 0 <= at <= duration:
            raise w.fail("agreement", i, "at", "within the scenario's duration")
        staleness = get(g, "agreement", i, "max_staleness", time_ms, 86_400_000)
        if staleness < 1000:
            raise w.fail("agreement", i, "max_staleness", "at least a second")
        specs.append(AgreementSpec(a, b, at, get(g, "agreement", i, "release", releases, AgreementSpec.release),
                                   staleness))  # fmt: skip
    for i, ev in enumerate(events):
        if ev.kind == "terminate-agreement" and not any(
            {ev.domain, ev.partner} == {x.a, x.b} and x.at <= ev.at for x in specs
        ):
            raise w.fail("event", i, "partner", "no [[agreement]] between the two domains in force by then")

    adversaries = []
    for i, a in enumerate(tables("adversary")):
        only(a, "adversary", i, {"kind", "node", "at", "until"})
        kind = get(
            a, "adversary", i, "kind", lambda v: v if v in ADVERSARY_KINDS else _bad(f"one of {ADVERSARY_KINDS}")
        )
        who, at = get(a, "adversary", i, "node", node_ref), get(a, "adversary", i, "at", time_ms)
        until = get(a, "adversary", i, "until", time_ms, None)
        if not 0 <= at <= duration or (until is not None and until <= at):
            raise w.fail("adversary", i, "until" if until is not None and until <= at else "at",
                         "'at' within the duration, and 'until' after it")  # fmt: skip
        adversaries.append(Adversary(kind, who, at, until))

    return Scenario(
        name=get(top, "scenario", None, "name", name_of,
                 re.sub(r"[^A-Za-z0-9._-]", "-", source.rsplit("/", 1)[-1].removesuffix(".toml"))[:64] or "scenario"),
        duration=duration, seed=get(top, "scenario", None, "seed", positive_int, 0), sample=sample,
        domains=tuple(domains), nodes=tuple(nodes), links=tuple(links), couriers=tuple(couriers),
        events=tuple(sorted(events, key=lambda e: e.at)), adversaries=tuple(adversaries), agreements=tuple(specs),
        source=source,
    )  # fmt: skip


def requests(value: Any) -> float:
    """A workload request rate: a number of SVID requests an hour, 0 to 1,000,000."""
    if type(value) not in (int, float) or not 0 <= value <= 1e6:
        raise ValueError("a number of requests an hour, 0 to 1,000,000")
    return float(value)


def _bad(message: str) -> Any:
    raise ValueError(message)
