"""Routing policy: which agents may take which work, and the assignment plan of one scheduling pass.

Pure: no I/O and no clock reads (`now` is a parameter), deterministic for a given state, so the
scheduler, the API (why is my item waiting?) and the tests share it.

Hard constraints (`eligible`): the agent is live (not offline, no pending shutdown), responsive
(it did not let an assignment time out without showing life since: `is_unresponsive`), has the item's
capability, accepts its boundary (an agent whose boundaries are empty or contain "*" accepts any),
is of a type the boundary's rule allows, is of the item's `requiredAgentType` if it names one, and
has a free slot. Plans also apply Warp's visibility (`visible_in`: private and user-only agents take
no work from weft) and count a Warp agent's load as the higher of what weft holds on it and what its
registry entry reports (`load_of`). Soft preferences rank the eligible agents: the item's
`preferredAgentType`, then the rule's preferred types in order, then the least loaded, then the guid
(for determinism).

A boundary rule comes from the `RoutingPolicy`; boundaries without a rule accept any agent type.
`DEFAULT_POLICY` enforces the original README's policy (corporate work goes only to copilot-cli).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import defaultdict
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

from projections.events import parse_ts
from projections.state import ProjectState, Record
from projections.worktable import WorkTable

ANY_BOUNDARY: Final = "*"

WaitCode = Literal[
    "backoff",  # retryAt is in the future
    "capability",  # no live agent has the capability
    "boundary-type",  # the boundary's rule excludes every live agent with the capability (or the required type)
    "boundary",  # no live agent with the capability (of an allowed type) accepts the boundary
    "required-type",  # no such agent is of the required type
    "busy",  # eligible agents exist but none has a free slot
    "spin-up",  # the caller reported a spin-up in progress for the item
]


class PolicyError(ValueError):
    """A routing policy document is invalid. `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class BoundaryRule:
    """Which agent types may serve a boundary (None = any) and which are preferred, in order."""

    name: str
    allowedAgentTypes: list[str] | None = None
    preferredAgentTypes: list[str] = field(default_factory=list)

    def allows(self, agent_type: str) -> bool:
        return self.allowedAgentTypes is None or agent_type in self.allowedAgentTypes

    def excluded_reason(self) -> str:
        return f"boundary {self.name} allows only {', '.join(self.allowedAgentTypes or [])}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowedAgentTypes": None if self.allowedAgentTypes is None else list(self.allowedAgentTypes),
            "preferredAgentTypes": list(self.preferredAgentTypes),
        }


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """Rules by boundary name, plus the priority aging that keeps low priority from starving.

    `aging_per_minute` is added to an item's priority for every minute it has waited since it was
    offered: with 0.1, a priority-1 item overtakes a fresh priority-10 item after 90 minutes.
    """

    rules: dict[str, BoundaryRule] = field(default_factory=dict)
    aging_per_minute: float = 0.1
    default_rule: BoundaryRule = field(default_factory=lambda: BoundaryRule(name=ANY_BOUNDARY))

    def rule_for(self, boundary: str) -> BoundaryRule:
        rule = self.rules.get(boundary)
        if rule is not None:
            return rule
        if self.default_rule.allowedAgentTypes is None and not self.default_rule.preferredAgentTypes:
            return self.default_rule
        # Name the boundary in reasons ("boundary X allows only ...") rather than "*".
        return BoundaryRule(boundary, self.default_rule.allowedAgentTypes, self.default_rule.preferredAgentTypes)

    def to_dict(self) -> dict[str, Any]:
        """The policy as a `load_policy` document (with `replaceDefaults`)."""
        return {
            "replaceDefaults": True,
            "agingPerMinute": self.aging_per_minute,
            "default": self.default_rule.to_dict(),
            "boundaries": {name: rule.to_dict() for name, rule in sorted(self.rules.items())},
        }


DEFAULT_POLICY: Final = RoutingPolicy(
    rules={
        "corporate": BoundaryRule("corporate", ["copilot-cli"], ["copilot-cli"]),
        "corporate-adjacent": BoundaryRule("corporate-adjacent", None, ["copilot-cli"]),
        "personal": BoundaryRule("personal", None, ["claude-code"]),
        "open-source": BoundaryRule("open-source", None, []),
    },
    aging_per_minute=0.1,
)


# --- policy documents --------------------------------------------------------------------------

_RULE_KEYS: Final = frozenset({"name", "allowedAgentTypes", "preferredAgentTypes"})
_TOP_KEYS: Final = frozenset({"replaceDefaults", "agingPerMinute", "default", "boundaries"})


def load_policy(text: str | bytes, base: RoutingPolicy = DEFAULT_POLICY) -> RoutingPolicy:
    """Parse a JSON routing policy (the caller reads the file or `WEFT_ROUTING_POLICY`).

    Document shape (every key optional)::

        {"agingPerMinute": 0.1,
         "default": {"allowedAgentTypes": null, "preferredAgentTypes": []},
         "boundaries": {"corporate": {"allowedAgentTypes": ["copilot-cli"],
                                      "preferredAgentTypes": ["copilot-cli"]}},
         "replaceDefaults": false}

    `boundaries` may also be a list of rules with a `name` each. Rules override `base`'s rule of the
    same boundary, others are kept, so a document that only tunes aging keeps the corporate rule;
    with `"replaceDefaults": true` the document's rules are the whole policy. `allowedAgentTypes`
    null means any type. Unknown keys are errors (a typo must not silently open a boundary).
    Raises `PolicyError` naming the bad field.
    """
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise PolicyError("policy", f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PolicyError("policy", "must be a JSON object")
    _no_unknown_keys(doc, _TOP_KEYS, "")

    replace = doc.get("replaceDefaults", False)
    if not isinstance(replace, bool):
        raise PolicyError("replaceDefaults", "must be true or false")

    aging: Any = doc.get("agingPerMinute", base.aging_per_minute)
    if isinstance(aging, bool) or not isinstance(aging, int | float) or not math.isfinite(aging) or aging < 0:
        raise PolicyError("agingPerMinute", "must be a finite number >= 0")

    default_rule = base.default_rule if not replace else BoundaryRule(ANY_BOUNDARY)
    if "default" in doc:
        default_rule = _parse_rule(doc["default"], ANY_BOUNDARY, "default")

    rules: dict[str, BoundaryRule] = {} if replace else dict(base.rules)
    raw_rules = doc.get("boundaries", {})
    if isinstance(raw_rules, dict):
        items: list[tuple[str, Any, str]] = [(name, body, f"boundaries.{name}") for name, body in raw_rules.items()]
    elif isinstance(raw_rules, list):
        items = []
        for i, body in enumerate(raw_rules):
            path = f"boundaries[{i}]"
            if not isinstance(body, dict):
                raise PolicyError(path, "must be an object")
            name = body.get("name")
            if not isinstance(name, str):
                raise PolicyError(f"{path}.name", "must be a non-empty string")
            items.append((name, body, path))
    else:
        raise PolicyError("boundaries", "must be an object keyed by boundary name or a list of rules")

    seen: set[str] = set()
    for name, body, path in items:
        if not isinstance(name, str) or not name.strip() or name == ANY_BOUNDARY:
            raise PolicyError(path, "boundary name must be a non-empty string other than '*'")
        if name in seen:
            raise PolicyError(path, f"duplicate rule for boundary {name}")
        seen.add(name)
        rules[name] = _parse_rule(body, name, path)
    return RoutingPolicy(rules=rules, aging_per_minute=float(aging), default_rule=default_rule)


def _no_unknown_keys(doc: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in sorted(doc):
        if key not in allowed:
            raise PolicyError(f"{prefix}{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _parse_rule(body: Any, name: str, path: str) -> BoundaryRule:
    if not isinstance(body, dict):
        raise PolicyError(path, "must be an object")
    _no_unknown_keys(body, _RULE_KEYS, f"{path}.")
    if "name" in body and body["name"] != name:
        raise PolicyError(f"{path}.name", f"does not match the boundary {name}")
    allowed_raw = body.get("allowedAgentTypes")
    allowed = None if allowed_raw is None else _type_list(allowed_raw, f"{path}.allowedAgentTypes")
    if allowed is not None and not allowed:
        raise PolicyError(f"{path}.allowedAgentTypes", "must be null (any type) or a non-empty list")
    preferred = _type_list(body.get("preferredAgentTypes", []), f"{path}.preferredAgentTypes")
    if allowed is not None:
        for i, t in enumerate(preferred):
            if t not in allowed:
                raise PolicyError(f"{path}.preferredAgentTypes[{i}]", f"{t} is not in allowedAgentTypes")
    return BoundaryRule(name, allowed, preferred)


def _type_list(raw: Any, path: str) -> list[str]:
    if not isinstance(raw, list):
        raise PolicyError(path, "must be a list of agent type names")
    out: list[str] = []
    for i, t in enumerate(raw):
        if not isinstance(t, str) or not t.strip():
            raise PolicyError(f"{path}[{i}]", "must be a non-empty string")
        if t in out:
            raise PolicyError(f"{path}[{i}]", f"duplicate agent type {t}")
        out.append(t)
    return out


# --- eligibility -------------------------------------------------------------------------------


def is_live(agent: Record) -> bool:
    """May take new work at all: not offline and not asked to shut down."""
    return agent["status"] != "offline" and not agent.get("shutdownRequested")


def accepts_boundary(agent: Record, boundary: str) -> bool:
    bounds = agent["boundaries"]
    return not bounds or boundary in bounds or ANY_BOUNDARY in bounds


def free_slots(agent: Record) -> int:
    return max(0, int(agent["maxConcurrentTasks"]) - len(agent["currentTasks"]))


UNRESPONSIVE_REASON: Final = "let an assignment time out and has not been heard from since"


def is_unresponsive(
    agent: Record, heard_from: Collection[str] = frozenset(), timed_out: Collection[str] = frozenset()
) -> bool:
    """Offered nothing for now: an assignment to it was withdrawn for not being accepted in time
    (`unresponsiveSince`, cleared by the agent's own next event), and the caller has not heard from
    it since (`heard_from`: a heartbeat after that time, which only the live scheduler knows), or the
    caller is withdrawing one of its assignments for that reason in this very pass (`timed_out`)."""
    if agent["guid"] in timed_out:
        return True
    return bool(agent.get("unresponsiveSince")) and agent["guid"] not in heard_from


def eligible(
    agent: Record, item: Record, policy: RoutingPolicy, heard_from: Collection[str] = frozenset()
) -> str | None:
    """None if `agent` may take `item` now, else why not (hard constraints only). `heard_from`: as
    for `plan_assignments`."""
    if agent["status"] == "offline":
        return "agent is offline"
    if agent.get("shutdownRequested"):
        return "agent is shutting down"
    if is_unresponsive(agent, heard_from):
        return f"agent {UNRESPONSIVE_REASON}"
    capability = item["capability"]
    if capability not in agent["capabilities"]:
        return f"agent lacks capability {capability}"
    boundary = item["boundary"]
    rule = policy.rule_for(boundary)
    if not rule.allows(agent["agentType"]):
        return rule.excluded_reason()
    if not accepts_boundary(agent, boundary):
        return f"agent does not accept boundary {boundary}"
    required = item.get("requiredAgentType")
    if required and agent["agentType"] != required:
        return f"required agent type {required}"
    if free_slots(agent) <= 0:
        return f"agent is at capacity ({len(agent['currentTasks'])}/{agent['maxConcurrentTasks']})"
    return None


def spin_up_agent_types(item: Record, policy: RoutingPolicy) -> list[str] | None:
    """Agent types a new agent for `item` may have, best first; None means any type (no preference).

    For choosing a spin-up target: the required type if any, else the item's preferred type (if the
    rule allows it), then the rule's preferred types, then its other allowed types.
    """
    rule = policy.rule_for(item["boundary"])
    required = item.get("requiredAgentType")
    if required:
        return [required] if rule.allows(required) else []
    order: list[str] = []
    preferred = item.get("preferredAgentType")
    if preferred and rule.allows(preferred):
        order.append(preferred)
    for t in [*rule.preferredAgentTypes, *(rule.allowedAgentTypes or [])]:
        if t not in order:
            order.append(t)
    if rule.allowedAgentTypes is None and not order:
        return None
    return order


# --- Warp visibility, reported load, the submit answer's agent type ------------------------------

DEFAULT_AGENT_TYPE: Final = "claude-code"  # the original's type when nothing else decides
# Visibilities no REST client and no project can satisfy: `private` is visible only to the agent
# itself, and `user-only` only to the same username, which no weft request or project carries.
HIDDEN_VISIBILITIES: Final = frozenset({"private", "user-only"})
# The label the Warp bridge keeps a Warp entry's own `currentTaskCount` in (work taken outside weft).
WARP_TASK_COUNT_LABEL: Final = "warpCurrentTaskCount"


def visible_in(agent: Record, project: str) -> bool:
    """Whether `agent` is visible to requests and work of `project` (Warp's rules): public to every
    project, project-only (the default, and any unknown value) to its own, private and user-only
    to none. weft agents are always project-only."""
    visibility = agent.get("visibility") or "project-only"
    if visibility == "public":
        return True
    if visibility in HIDDEN_VISIBILITIES:
        return False
    return bool(agent.get("projectId") == project)


def load_of(agent: Record) -> int:
    """An agent's load against its capacity: the items weft holds on it, or, for a Warp agent, the
    task count its registry entry reports if that is higher (Warp agents also take work of their own)."""
    held = len(agent["currentTasks"])
    if agent.get("source") != "warp":
        return held
    raw = (agent.get("labels") or {}).get(WARP_TASK_COUNT_LABEL)
    try:
        reported = int(raw) if raw is not None else 0
    except (TypeError, ValueError):
        reported = 0
    return max(held, reported)


def reported_agent_type(state: ProjectState, item: Record, policy: RoutingPolicy) -> str:
    """The `targetAgentType` of a submit answer, by the original's routing steps (weft-protocol
    §1.4): the required type wins; else, among the types of the live, visible agents that could
    take the item (capacity aside), the item's preferred type, then the boundary's preferred types
    in order (the original's preferred, then fallback), then the first registered; with none, the
    type a spin-up would launch, else `claude-code` (or the boundary's first allowed type).

    Unlike the original, the item's own `preferredAgentType` counts whenever the boundary allows
    it, because weft's assignment really prefers it (the original honours it only if it happened
    to be among the types it considered)."""
    required = item.get("requiredAgentType")
    if required:
        return str(required)
    boundary, capability = item["boundary"], item["capability"]
    rule = policy.rule_for(boundary)
    available: list[str] = []
    for agent in state.agents.values():  # registration order: the fold's, the same on every replica
        agent_type = agent["agentType"]
        if agent_type in available or not is_live(agent) or not visible_in(agent, state.project):
            continue
        if capability in agent["capabilities"] and rule.allows(agent_type) and accepts_boundary(agent, boundary):
            available.append(agent_type)
    if available:
        for t in (item.get("preferredAgentType"), *rule.preferredAgentTypes):
            if t and t in available:
                return str(t)
        return available[0]
    launchable = spin_up_agent_types(item, policy)
    if launchable:
        return launchable[0]
    if rule.allows(DEFAULT_AGENT_TYPE) or not rule.allowedAgentTypes:
        return DEFAULT_AGENT_TYPE
    return rule.allowedAgentTypes[0]


# --- planning ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """One scheduling pass: assignments in decision order, and why every other pending item waits."""

    assignments: list[tuple[str, str]] = field(default_factory=list)  # (work id, agent guid)
    waiting: dict[str, str] = field(default_factory=dict)  # work id -> waitingReason
    codes: dict[str, WaitCode] = field(default_factory=dict)  # work id -> machine-readable reason


@dataclass(slots=True)
class _Slot:
    """An agent's load as the plan consumes its capacity."""

    guid: str
    agent_type: str
    capacity: int
    load: int

    def key(self) -> tuple[float, int, str]:
        return (self.load / self.capacity, self.load, self.guid)


@dataclass(slots=True)
class _Class:
    """Items that share capability, boundary and type constraints share their candidate agents."""

    ranked: list[tuple[int, _Slot]]  # (preference rank, slot), statically eligible agents
    reason: str | None  # set when no agent is statically eligible
    code: WaitCode | None
    exhausted: bool = False  # capacity only shrinks within a plan, so once full, always full


def effective_priority(item: Record, now: datetime, aging_per_minute: float) -> float:
    """priority + minutes waited since offeredAt * aging (never less than the priority itself)."""
    waited_min = max(0.0, (now - _parse_ts(item["offeredAt"])).total_seconds() / 60.0)
    return float(item["priority"]) + waited_min * aging_per_minute


def reason_for_new_item(state: ProjectState, item: Record, policy: RoutingPolicy, now: datetime) -> str | None:
    """Why a just-submitted item would wait (None: an eligible agent has a free slot now), judged
    as if it were the only pending item: O(agents), for the submit response."""
    alone = ProjectState(
        project=state.project, work=WorkTable({item["id"]: item}), agents=state.agents, targets=state.targets
    )
    alone.reindex_work()
    return plan_assignments(alone, policy, now).waiting.get(item["id"])


def plan_assignments(
    state: ProjectState,
    policy: RoutingPolicy,
    now: datetime,
    spinning_up: Iterable[str] = frozenset(),
    *,
    heard_from: Collection[str] = frozenset(),
    timed_out: Collection[str] = frozenset(),
) -> Plan:
    """Decide which pending items go to which agents now, and why the rest wait.

    Candidates are `pending` items whose `retryAt` is unset or due. They are taken in order of
    effective priority (highest first), then `offeredAt`, then id; each goes to the best eligible
    agent with a free slot (preferred type, then least loaded, then guid). Capacity is consumed as
    the plan goes, so an agent never gets more than it has room for and no item is planned twice.
    Items in `spinning_up` that stay unassigned wait with `spin-up in progress`.

    Unresponsive agents (`is_unresponsive`) get nothing: an agent that let an assignment time out
    may be dead, and feeding it more work would only burn the items' attempts. `heard_from` names
    the marked agents the caller heard a heartbeat from since they were marked (they get work again);
    `timed_out` the agents whose assignments the caller is withdrawing for not being accepted in
    time in this same pass (not marked in `state` yet).
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    spinning = spinning_up if isinstance(spinning_up, set | frozenset) else frozenset(spinning_up)
    plan = Plan()

    # Live agents, indexed by capability; one mutable slot per agent shared by every class.
    by_capability: dict[str, list[tuple[Record, _Slot]]] = defaultdict(list)
    unresponsive_caps: set[str] = set()
    for guid in sorted(state.agents):
        agent = state.agents[guid]
        if not is_live(agent):
            continue
        if is_unresponsive(agent, heard_from, timed_out):
            unresponsive_caps.update(agent["capabilities"])
            continue
        if not visible_in(agent, state.project):
            continue  # Warp visibility: private and user-only agents take no work from weft
        slot = _Slot(guid, agent["agentType"], int(agent["maxConcurrentTasks"]), load_of(agent))
        for cap in set(agent["capabilities"]):
            by_capability[cap].append((agent, slot))

    # Items by class first: a class no agent can serve, or whose agents are all full (capacity
    # only shrinks within a plan), gives each of its items its reason without ordering them. Only
    # the rest are ordered, lazily (a heap), and only until every class among them is full: a
    # backlog of 30,000 items no agent can take costs a pass (~55 ms here), not a sort (130-200 ms).
    by_class: dict[tuple[str, str, str | None, str | None], list[Record]] = defaultdict(list)
    for item in state.work_in("pending"):
        retry_at = item.get("retryAt")
        if retry_at and _parse_ts(retry_at) > now:
            wid = item["id"]
            plan.waiting[wid] = f"retry backoff until {retry_at}"
            plan.codes[wid] = "backoff"
            continue
        ckey = (item["capability"], item["boundary"], item.get("requiredAgentType") or None,
                item.get("preferredAgentType") or None)
        by_class[ckey].append(item)

    aging = policy.aging_per_minute
    heap: list[tuple[float, datetime, str, Record, _Class]] = []
    open_classes = 0
    for ckey, items in by_class.items():
        cls = _build_class(ckey, by_capability, policy, unresponsive_caps)
        if cls.reason is None and _best(cls) is None:
            cls.exhausted = True
        if cls.reason is not None or cls.exhausted:
            for item in items:
                _wait(plan, item["id"], cls, spinning)
            continue
        open_classes += 1
        for item in items:
            offered = _parse_ts(item["offeredAt"])
            waited_min = max(0.0, (now - offered).total_seconds() / 60.0)
            heap.append((-(float(item["priority"]) + waited_min * aging), offered, item["id"], item, cls))
    heapq.heapify(heap)  # (effective priority, offeredAt, id): ids are unique, so nothing ties

    while heap and open_classes:
        _neg, _offered, wid, item, cls = heapq.heappop(heap)
        chosen = None if cls.exhausted else _best(cls)
        if chosen is not None:
            chosen.load += 1
            plan.assignments.append((wid, chosen.guid))
            continue
        if not cls.exhausted:
            cls.exhausted = True
            open_classes -= 1
        _wait(plan, wid, cls, spinning)
    for _neg, _offered, wid, _item, cls in heap:  # every class is full now
        _wait(plan, wid, cls, spinning)
    return plan


def _wait(plan: Plan, wid: str, cls: _Class, spinning: Container[str]) -> None:
    if wid in spinning:
        plan.waiting[wid] = "spin-up in progress"
        plan.codes[wid] = "spin-up"
    else:
        plan.waiting[wid] = cls.reason or "all eligible agents busy"
        plan.codes[wid] = cls.code or "busy"


def _build_class(
    ckey: tuple[str, str, str | None, str | None],
    by_capability: Mapping[str, Sequence[tuple[Record, _Slot]]],
    policy: RoutingPolicy,
    unresponsive_caps: Container[str] = frozenset(),
) -> _Class:
    capability, boundary, required, preferred = ckey
    rule = policy.rule_for(boundary)
    with_cap = by_capability.get(capability, ())
    if not with_cap:
        if capability in unresponsive_caps:  # still "capability": a replacement may be spun up
            return _Class([], f"no responsive agent with capability {capability}: each one {UNRESPONSIVE_REASON}",
                          "capability")
        return _Class([], f"no agent with capability {capability}", "capability")
    if required and not rule.allows(required):
        return _Class([], rule.excluded_reason(), "boundary-type")
    allowed = [(a, s) for a, s in with_cap if rule.allows(s.agent_type)]
    if not allowed:
        return _Class([], rule.excluded_reason(), "boundary-type")
    accepting = [(a, s) for a, s in allowed if accepts_boundary(a, boundary)]
    if not accepting:
        return _Class([], f"no agent accepts boundary {boundary}", "boundary")
    typed = [s for _a, s in accepting if not required or s.agent_type == required]
    if not typed:
        return _Class([], f"required agent type {required} not available", "required-type")
    prefs = rule.preferredAgentTypes
    ranked = []
    for s in typed:
        if preferred and s.agent_type == preferred:
            rank = 0
        elif s.agent_type in prefs:
            rank = 1 + prefs.index(s.agent_type)
        else:
            rank = 1 + len(prefs)
        ranked.append((rank, s))
    return _Class(ranked, None, None)


def _best(cls: _Class) -> _Slot | None:
    best: _Slot | None = None
    best_key: tuple[int, float, int, str] | None = None
    for rank, s in cls.ranked:
        if s.load >= s.capacity:
            continue
        key = (rank, *s.key())
        if best_key is None or key < best_key:
            best, best_key = s, key
    return best


@functools.lru_cache(maxsize=65536)
def _parse_ts(ts: str) -> datetime:
    # Every plan re-reads every pending item's offeredAt: memoised, a plan over 10k items does not
    # parse 10k timestamps again (immutable datetimes make the cache safe).
    dt = parse_ts(ts)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
