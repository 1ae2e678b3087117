"""The spin-up allow-list's rules (pure): what each target names, and what a policy allows."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from weft.core.errors import Forbidden
from weft.core.spinup_policy import ALLOW_ALL, PolicyFileError, parse_policy, uses
from weft.core.targets import validate_new_target
from weft.spinup import SCHEMAS


def target(mechanism: str, config: dict[str, Any]) -> dict[str, Any]:
    return validate_new_target({"name": "t", "agentType": "claude-code", "mechanism": mechanism,
                                "capabilities": ["python"], "config": config}, SCHEMAS)


SSH = target("ssh", {"ssh": {"host": "Build-1.corp.example", "user": "ci", "command": "/opt/agents/weft-agent --x"}})
LOCAL = target("local", {"local": {"command": "weft agent --capabilities python"}})
WEBHOOK = target("webhook", {"webhook": {"url": "https://hooks.corp.example/spin", "stopUrl": "https://stop.example/x",
                                         "healthCheck": {"url": "https://health.example/h"}}})
GITHUB = target("github-actions", {"githubActions": {"repo": "acme/agents", "workflow": "agent.yml"}})
K8S = target("kubernetes", {"kubernetes": {"image": "ghcr.io/acme/agent:1.2", "apiServer": "https://k8s.corp:6443",
                                           "command": ["weft", "agent"]}})


def policy(**projects: Any) -> Any:
    return parse_policy(orjson.dumps({"projects": projects}))


def test_every_host_command_and_image_a_target_names_is_checked() -> None:
    assert set(uses(SSH)) == {("mechanisms", "mechanism", "ssh"), ("hosts", "config.ssh.host", "Build-1.corp.example"),
                              ("commands", "config.ssh.command", "/opt/agents/weft-agent")}
    assert ("commands", "config.local.command", "weft") in set(uses(LOCAL))
    assert {f for k, f, _ in uses(WEBHOOK) if k == "hosts"} == {
        "config.webhook.url", "config.webhook.stopUrl", "config.webhook.healthCheck.url"}
    # GitHub's host is checked even when the target leaves apiUrl at its default.
    assert ("hosts", "config.githubActions.apiUrl", "api.github.com") in set(uses(GITHUB))
    assert {("hosts", "config.kubernetes.apiServer", "k8s.corp"), ("images", "config.kubernetes.image",
            "ghcr.io/acme/agent:1.2"), ("commands", "config.kubernetes.command", "weft")} <= set(uses(K8S))


def test_without_a_policy_everything_is_allowed() -> None:
    for t in (SSH, LOCAL, WEBHOOK, GITHUB, K8S):
        ALLOW_ALL.check("any", t)


def test_a_project_uses_its_entry_else_the_star_entry_else_nothing() -> None:
    p = policy(**{"*": {"mechanisms": ["ssh"]}, "sandbox": {"mechanisms": ["local"]}})
    p.check("sandbox", LOCAL)
    p.check("other", SSH)
    with pytest.raises(Forbidden) as err:
        p.check("sandbox", SSH)
    assert err.value.field == "mechanism" and err.value.details["setting"] == "WEFT_SPINUP_POLICY_FILE"
    with pytest.raises(Forbidden, match="no entry"):
        policy(sandbox={}).check("other", LOCAL)


def test_hosts_commands_and_images_match_globs() -> None:
    p = policy(**{"*": {"hosts": ["*.corp.example", "api.github.com"], "commands": ["/opt/agents/*", "weft"],
                        "images": ["ghcr.io/acme/*"]}})
    p.check("p", SSH)  # host matched case-insensitively
    p.check("p", LOCAL)
    p.check("p", GITHUB)
    for t, field in ((WEBHOOK, "config.webhook.stopUrl"), (K8S, "config.kubernetes.apiServer")):
        with pytest.raises(Forbidden) as err:
            p.check("p", t)
        assert err.value.field == field
    with pytest.raises(Forbidden) as err:
        policy(**{"*": {"commands": ["weft"]}}).check("p", SSH)
    assert err.value.field == "config.ssh.command" and "/opt/agents/weft-agent" in err.value.message


def test_an_empty_list_allows_nothing_and_a_missing_one_everything() -> None:
    with pytest.raises(Forbidden):
        policy(**{"*": {"hosts": []}}).check("p", SSH)
    policy(**{"*": {"mechanisms": ["ssh"]}}).check("p", SSH)


@pytest.mark.parametrize("raw, where", [
    (b"{", "not JSON"),
    (b"[]", "projects"),
    (b'{"projects": {"p": []}}', "projects.p must be an object"),
    (b'{"projects": {"p": {"host": ["x"]}}}', "projects.p.host is not one of"),
    (b'{"projects": {"p": {"hosts": "x"}}}', "projects.p.hosts must be a list"),
    (b'{"projects": {"p": {"hosts": [""]}}}', "projects.p.hosts must be a list"),
])
def test_a_bad_file_is_refused_saying_where(raw: bytes, where: str) -> None:
    with pytest.raises(PolicyFileError, match=where):
        parse_policy(raw)
