"""Pure parts of the Loominal compatibility fixes: the submit answer's agent type, Warp visibility
and reported load, Warp entry parsing, targets as registered (see tests/integration/test_compat.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from projections.state import ProjectState, Record
from tests.unit.test_routing import CLAUDE, COPILOT, NOW, make_agent, make_work
from weft.core import targets
from weft.core.errors import InvalidInput
from weft.core.routing import (
    DEFAULT_POLICY,
    WARP_TASK_COUNT_LABEL,
    load_of,
    load_policy,
    plan_assignments,
    reported_agent_type,
    visible_in,
)
from weft.runtime.warp_bridge import declaration, parse_entry
from weft.spinup import SCHEMAS


def state_of(*agents: Record) -> ProjectState:
    return ProjectState(project="p", agents={a["guid"]: a for a in agents})


# --- the submit answer's agent type (weft-protocol §1.4) ------------------------------------------


@pytest.mark.parametrize(
    "agents,work,expected",
    [
        ((), {"boundary": "open-source"}, CLAUDE),  # nothing decides: the original's default
        ((), {"boundary": "somewhere-else"}, CLAUDE),
        ((), {"boundary": "corporate"}, COPILOT),  # the boundary's preferred type
        ((), {"boundary": "personal", "preferred": COPILOT}, COPILOT),  # what a spin-up would launch
        ((), {"boundary": "corporate", "required": COPILOT}, COPILOT),
        ((("a", COPILOT),), {"boundary": "open-source"}, COPILOT),  # first available
        ((("a", COPILOT),), {"boundary": "personal"}, COPILOT),  # preferred claude-code is not there
        ((("a", COPILOT), ("b", CLAUDE)), {"boundary": "personal"}, CLAUDE),  # preferred
        ((("a", CLAUDE), ("b", COPILOT)), {"boundary": "corporate-adjacent"}, COPILOT),
        ((("a", CLAUDE), ("b", COPILOT)), {"boundary": "open-source"}, CLAUDE),  # first registered
        ((("a", CLAUDE), ("b", COPILOT)), {"boundary": "personal", "preferred": COPILOT}, COPILOT),
        ((("a", CLAUDE),), {"boundary": "personal", "required": COPILOT}, COPILOT),  # required wins
        ((("a", CLAUDE),), {"boundary": "corporate"}, COPILOT),  # claude-code may not serve corporate
    ],
)
def test_reported_agent_type_follows_the_original_steps(
    agents: tuple[tuple[str, str], ...], work: dict[str, Any], expected: str
) -> None:
    state = state_of(*(make_agent(g, t) for g, t in agents))
    assert reported_agent_type(state, make_work("w", **work), DEFAULT_POLICY) == expected


def test_reported_agent_type_ignores_agents_that_cannot_take_the_item() -> None:
    offline = make_agent("a", COPILOT, status="offline")
    other_cap = make_agent("b", COPILOT, caps=("rust",))
    elsewhere = make_agent("c", COPILOT, boundaries=("client-x",))
    private = make_agent("d", COPILOT)
    private["visibility"] = "private"
    state = state_of(offline, other_cap, elsewhere, private)
    assert reported_agent_type(state, make_work("w", boundary="open-source"), DEFAULT_POLICY) == CLAUDE


def test_reported_agent_type_never_names_a_type_the_boundary_refuses() -> None:
    policy = load_policy(orjson.dumps({"boundaries": {"vault": {"allowedAgentTypes": ["auditor"]}}}))
    assert reported_agent_type(state_of(), make_work("w", boundary="vault"), policy) == "auditor"


# --- visibility and reported load -----------------------------------------------------------------


def test_visibility_rules() -> None:
    a = make_agent("a")
    assert a["visibility"] == "project-only" and visible_in(a, "p") and not visible_in(a, "q")
    for vis, in_p, in_q in (("public", True, True), ("private", False, False), ("user-only", False, False),
                            ("something-new", True, False)):
        a["visibility"] = vis
        assert (visible_in(a, "p"), visible_in(a, "q")) == (in_p, in_q), vis


def test_plans_skip_hidden_agents_and_count_reported_load() -> None:
    private = make_agent("a", max_tasks=5)
    private["visibility"] = "private"
    assert plan_assignments(state_of(private), DEFAULT_POLICY, NOW).assignments == []
    full = make_agent("b", max_tasks=2)
    full.update(source="warp", labels={WARP_TASK_COUNT_LABEL: "2"})
    assert load_of(full) == 2
    state = ProjectState(project="p", agents={"b": full}, work={"w": make_work("w")})  # type: ignore[arg-type]
    state.reindex_work()
    assert plan_assignments(state, DEFAULT_POLICY, NOW).waiting == {"w": "all eligible agents busy"}
    full["labels"][WARP_TASK_COUNT_LABEL] = "1"
    assert plan_assignments(state, DEFAULT_POLICY, NOW).assignments == [("w", "b")]
    native = make_agent("c")
    native["labels"] = {WARP_TASK_COUNT_LABEL: "9"}  # only a Warp entry's report counts
    assert load_of(native) == 0


# --- Warp entries --------------------------------------------------------------------------------


def entry(**body: Any) -> dict[str, Any]:
    decl_entry = parse_entry("g", orjson.dumps({"guid": "g", "capabilities": ["python"], **body}))
    assert decl_entry is not None
    return declaration(decl_entry)


def test_entries_keep_their_boundaries_type_and_limits() -> None:
    sparse = entry()
    assert sparse["boundaries"] == ["default"] and sparse["agentType"] == "warp"
    assert sparse["maxConcurrentTasks"] == 1 and sparse["spindownAfterIdleMs"] is None and sparse["labels"] == {}
    meta = entry(agentType="developer", boundaries=["open-source"],
                 metadata={"agentType": "copilot-cli", "boundaries": ["corporate", "*", "corporate"]})
    assert meta["agentType"] == "copilot-cli" and meta["boundaries"] == ["corporate"]  # the original's fields first
    top = entry(agentType="developer", boundaries=["open-source"], maxConcurrentTasks=4, currentTaskCount=3,
                spindownAfterIdleMs=1000)
    assert top["agentType"] == "developer" and top["boundaries"] == ["open-source"]
    assert top["maxConcurrentTasks"] == 4 and top["spindownAfterIdleMs"] == 1000
    assert top["labels"] == {WARP_TASK_COUNT_LABEL: "3"}
    assert entry(boundaries=["*"])["boundaries"] == ["default"]  # never a wildcard
    junk = entry(boundaries="personal", maxConcurrentTasks=0, currentTaskCount=-1, spindownAfterIdleMs=True,
                 metadata=["x"])
    assert junk["boundaries"] == ["default"] and junk["maxConcurrentTasks"] == 1
    assert junk["labels"] == {} and junk["spindownAfterIdleMs"] is None


# --- targets as registered -----------------------------------------------------------------------


def target(mechanism: str, config: Any) -> dict[str, Any]:
    return targets.validate_new_target({"name": "t", "agentType": "x", "mechanism": mechanism,
                                           "capabilities": ["python"], "config": config}, SCHEMAS)


def test_registered_config_keeps_the_clients_shape() -> None:
    flat = target("ssh", {"host": "h", "user": "u", "command": "weft agent"})
    assert flat["registeredConfig"] == {"host": "h", "user": "u", "command": "weft agent"}
    assert flat["config"]["ssh"]["port"] == 22
    other_block = target("local", {"command": "x", "ssh": {"host": "ignored"}})
    assert other_block["registeredConfig"] == {"command": "x"}  # what normalisation ignores is not shown
    k8s = target("kubernetes", {"image": "img"})
    assert k8s["config"]["kubernetes"]["namespace"] == "default" and k8s["registeredConfig"] == {"image": "img"}
    changes = targets.validate_update(flat, {"config": {"port": 2222}}, SCHEMAS)
    assert changes["registeredConfig"] == {"host": "h", "user": "u", "command": "weft agent", "port": 2222}
    assert changes["config"]["ssh"]["port"] == 2222
    old = {k: v for k, v in flat.items() if k != "registeredConfig"}  # registered before it was kept
    assert "registeredConfig" not in targets.validate_update(old, {"config": {"port": 2222}}, SCHEMAS)
    with pytest.raises(InvalidInput) as err:
        targets.validate_update(flat, {"config": {"ssh": "not an object"}}, SCHEMAS)
    assert err.value.field == "config.ssh"
    with pytest.raises(InvalidInput) as err:
        targets.validate_update(flat, {"registeredConfig": {}}, SCHEMAS)
    assert err.value.field == "registeredConfig"
