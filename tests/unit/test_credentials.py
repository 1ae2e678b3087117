"""Literal credentials in target definitions (issue 14, found 3): the 21 places the probe stored a
secret verbatim are each refused with a 400 naming the field and never quoting the value; the
references and ordinary values of real targets still pass."""

from __future__ import annotations

from typing import Any

import pytest

from weft.core.credentials import redact_credentials
from weft.core.errors import InvalidInput
from weft.core.targets import validate_new_target, validate_update
from weft.spinup import SCHEMAS

SECRET = "hunter2-Zq8xV3pL"  # a value no rule knows the shape of: only its place gives it away
GH = "ghp_" + "a1B2c3D4e5" * 4
PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"


def target(mechanism: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "t", "agentType": "claude-code", "mechanism": mechanism, "capabilities": ["python"],
            "config": config, **extra}


HOOK = {"url": "https://hooks.example.test/spin"}
K8S = {"image": "ghcr.io/acme/agent:1"}
GHA = {"repo": "acme/agents", "workflow": "agent.yml"}
SSH = {"host": "127.0.0.1", "user": "agent", "command": "weft agent"}

FOUND = [
    ("header X-Api-Key", target("webhook", {**HOOK, "headers": {"X-Api-Key": SECRET}}), "config.webhook.headers.X-Api-Key"),
    ("header Cookie", target("webhook", {**HOOK, "headers": {"Cookie": f"sid={SECRET}"}}), "config.webhook.headers.Cookie"),
    ("header X-Auth-Key", target("webhook", {**HOOK, "headers": {"X-Auth-Key": SECRET}}), "config.webhook.headers.X-Auth-Key"),
    ("url user:pass@", target("webhook", {"url": f"https://bot:{SECRET}@hooks.example.test/"}), "config.webhook.url"),
    ("url ?access_token=", target("webhook", {"url": f"https://hooks.example.test/?access_token={SECRET}"}),
     "config.webhook.url"),
    ("stopUrl creds", target("webhook", {**HOOK, "stopUrl": f"https://u:{SECRET}@hooks.example.test/stop"}),
     "config.webhook.stopUrl"),
    ("healthCheck.url creds", target("webhook", HOOK, healthCheck={"url": f"https://u:{SECRET}@h.example.test/"}),
     "healthCheck.url"),
    ("apiServer creds", target("kubernetes", {**K8S, "apiServer": f"https://admin:{SECRET}@k8s.example.test"}),
     "config.kubernetes.apiServer"),
    ("bodyTemplate field", target("webhook", {**HOOK, "bodyTemplate": {"auth": {"token": SECRET}}}),
     "config.webhook.bodyTemplate.auth"),
    ("env GH_PAT", target("local", {"command": "weft agent", "env": {"GH_PAT": SECRET}}), "config.local.env.GH_PAT"),
    ("env DB_PWD", target("local", {"command": "weft agent", "env": {"DB_PWD": SECRET}}), "config.local.env.DB_PWD"),
    ("env AWS_ACCESS_KEY_ID", target("ssh", {**SSH, "env": {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE"}}),
     "config.ssh.env.AWS_ACCESS_KEY_ID"),
    ("env OPENAI_KEY", target("local", {"command": "weft agent", "env": {"OPENAI_KEY": SECRET}}),
     "config.local.env.OPENAI_KEY"),
    ("token as integer", target("github-actions", {**GHA, "token": 123456789}), "config.githubActions.token"),
    ("password as list", target("webhook", {**HOOK, "bodyTemplate": {"password": [SECRET]}}),
     "config.webhook.bodyTemplate.password"),
    ("secret as object", target("webhook", {**HOOK, "bodyTemplate": {"secret": {"v": SECRET}}}),
     "config.webhook.bodyTemplate.secret"),
    ("key material in privateKeyPath", target("ssh", {**SSH, "privateKeyPath": PEM}), "config.ssh.privateKeyPath"),
    ("inline kubeconfig", target("kubernetes", {**K8S, "kubeconfig": "apiVersion: v1\nclusters: []\nusers: []"}),
     "config.kubernetes.kubeconfig"),
    ("GitHub inputs.deploy_key", target("github-actions", {**GHA, "inputs": {"deploy_key": SECRET}}),
     "config.githubActions.inputs.deploy_key"),
    ("token in command", target("local", {"command": f"GH_TOKEN={SECRET} weft agent"}), "config.local.command"),
    ("provider token in command", target("ssh", {**SSH, "command": f"weft agent --header {GH}"}),
     "config.ssh.command"),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in FOUND], ids=[n for n, _, _ in FOUND])
def test_a_literal_credential_is_refused_naming_its_field_and_never_its_value(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_new_target(body, SCHEMAS)
    assert err.value.field == field
    assert SECRET not in err.value.message and GH not in err.value.message and "BEGIN" not in err.value.message


def test_an_update_is_checked_as_a_registration_is() -> None:
    current = validate_new_target(target("webhook", HOOK), SCHEMAS)
    with pytest.raises(InvalidInput) as err:
        validate_update(current, {"config": {"headers": {"Cookie": SECRET}}}, SCHEMAS)
    assert err.value.field == "config.webhook.headers.Cookie"


@pytest.mark.parametrize("body", [
    target("webhook", {**HOOK, "headers": {"Authorization": "env:HOOK_TOKEN", "X-Trace": "on"},
                       "bodyTemplate": {"token": "file:/run/secrets/hook"}}),
    target("local", {"command": 'GH_TOKEN="$GH_TOKEN" weft agent --token "$WEFT_TOKEN"',
                     "env": {"MODEL": "opus", "OPENAI_KEY": "env:OPENAI_KEY"}}),
    target("kubernetes", {**K8S, "env": {"DB_PWD": "secret:db/password"}, "tokenRef": "env:K8S_TOKEN",
                          "apiServer": "https://127.0.0.1:6443"}),
    target("github-actions", {**GHA, "token": "env:GH_PAT", "inputs": {"label": "gpu"}}),
    target("ssh", {**SSH, "privateKeyPath": "/home/agent/.ssh/id_ed25519"}),
])
def test_references_and_ordinary_values_pass(body: dict[str, Any]) -> None:
    validate_new_target(body, SCHEMAS)


def test_stored_literals_from_older_versions_are_masked_on_the_way_out() -> None:
    stored = {"headers": {"Cookie": SECRET, "X-Trace": "on"}, "url": f"https://u:{SECRET}@h.example.test/",
              "env": {"OPENAI_KEY": "env:OPENAI_KEY"}}
    shown = redact_credentials(stored)
    assert SECRET not in str(shown)
    assert shown["headers"]["X-Trace"] == "on" and shown["env"]["OPENAI_KEY"] == "env:OPENAI_KEY"
