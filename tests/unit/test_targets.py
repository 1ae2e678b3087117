"""Target validation through the mechanism registry (weft.core.targets with weft.spinup.SCHEMAS)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from weft.core.errors import InvalidInput
from weft.core.targets import ConfigSchema, validate_new_target, validate_update
from weft.spinup import REGISTRY, SCHEMAS, build_mechanisms
from weft.spinup.base import SpinUpRequest, mechanism_config, redact
from weft.spinup.local import redact_env

# The smallest valid config of each mechanism (flat, as the Shuttle CLI sends it).
MINIMAL: dict[str, dict[str, Any]] = {
    "local": {"command": "weft agent"},
    "ssh": {"host": "h", "user": "u", "command": "weft agent"},
    "kubernetes": {"image": "ghcr.io/acme/agent:1"},
    "github-actions": {"repo": "acme/agents", "workflow": "agent.yml"},
    "webhook": {"url": "https://hooks.example/spin"},
}


def body(mechanism: str, config: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "t", "agentType": "x", "mechanism": mechanism, "capabilities": ["python"],
            "config": config, **extra}


def register(mechanism: str, config: Any) -> dict[str, Any]:
    return validate_new_target(body(mechanism, config), SCHEMAS)


def test_every_mechanism_has_a_minimal_config_here() -> None:
    assert set(MINIMAL) == set(SCHEMAS)


# --- the registry is the single source -------------------------------------------------------------


def test_every_schema_has_a_mechanism_and_every_mechanism_a_schema() -> None:
    built = build_mechanisms()
    assert set(built) == set(SCHEMAS)
    assert [r.schema.mechanism for r in REGISTRY] == list(SCHEMAS)  # each registered once
    for name, mechanism in built.items():
        assert mechanism.name == name and SCHEMAS[name].mechanism == name
    keys = [s.key for s in SCHEMAS.values()]
    assert len(set(keys)) == len(keys) and "mechanism" not in keys


def test_the_api_documents_no_mechanism_the_registry_lacks() -> None:
    from weft.api.openapi import document

    found = 0
    for schema in document()["components"]["schemas"].values():
        prop = schema.get("properties", {}).get("mechanism")
        if prop is None:
            continue
        found += 1
        options = [prop, *prop.get("anyOf", [])]
        enums = {v for option in options for v in option.get("enum", []) if v is not None}
        assert not enums or enums == set(SCHEMAS), enums
    assert found  # TargetRegister, TargetFilter


def test_importing_the_registry_imports_no_mechanism_library() -> None:
    code = ("import sys, weft.spinup; "
            "print(sorted(m for m in ('asyncssh', 'aiohttp', 'kubernetes', 'urllib3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_mechanism_whose_library_is_missing_is_left_out(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from weft.spinup.kubernetes import KubernetesMechanism

    monkeypatch.setattr(KubernetesMechanism, "requires", ("weft_no_such_library",))
    built = build_mechanisms()
    assert "kubernetes" not in built and set(built) == set(SCHEMAS) - {"kubernetes"}
    assert "spin-up mechanism kubernetes unavailable" in caplog.text
    register("kubernetes", MINIMAL["kubernetes"])  # its targets still validate


# --- validation, per mechanism ---------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", list(MINIMAL))
def test_defaults_are_applied(mechanism: str) -> None:
    schema = SCHEMAS[mechanism]
    config = register(mechanism, MINIMAL[mechanism])["config"]
    assert set(config) == {"mechanism", schema.key} and config["mechanism"] == mechanism
    block = config[schema.key]
    assert schema.defaults and {k: block[k] for k in schema.defaults} == dict(schema.defaults)
    assert {k: block[k] for k in MINIMAL[mechanism]} == MINIMAL[mechanism]


@pytest.mark.parametrize("mechanism", list(MINIMAL))
def test_flat_and_nested_configs_normalise_alike(mechanism: str) -> None:
    key = SCHEMAS[mechanism].key
    flat = register(mechanism, MINIMAL[mechanism])
    nested = register(mechanism, {"mechanism": mechanism, key: MINIMAL[mechanism]})
    assert flat["config"] == nested["config"]
    assert flat["registeredConfig"] == MINIMAL[mechanism]  # each as the client sent it
    assert nested["registeredConfig"] == {"mechanism": mechanism, key: MINIMAL[mechanism]}


def test_defaults_are_not_shared_between_targets() -> None:
    one = register("local", MINIMAL["local"])
    one["config"]["local"]["env"]["X"] = "1"
    assert register("local", MINIMAL["local"])["config"]["local"]["env"] == {}
    assert SCHEMAS["local"].defaults["env"] == {}


@pytest.mark.parametrize(
    "mechanism,name", [(m, name) for m, schema in SCHEMAS.items() for name in schema.required]
)
@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_a_missing_required_field_is_named(mechanism: str, name: str, shape: str) -> None:
    key = SCHEMAS[mechanism].key
    config = {k: v for k, v in MINIMAL[mechanism].items() if k != name}
    with pytest.raises(InvalidInput) as err:
        register(mechanism, config if shape == "flat" else {key: config})
    assert err.value.field == f"config.{key}.{name}"
    assert f"config.{key}.{name} is required" in str(err.value)


def test_an_unknown_mechanism_is_rejected_naming_the_field() -> None:
    for mechanism in ("ftp", None, 3, ["local"]):
        with pytest.raises(InvalidInput) as err:
            validate_new_target(body(mechanism, {"command": "x"}), SCHEMAS)  # type: ignore[arg-type]
        assert err.value.field == "mechanism"
        assert all(name in str(err.value) for name in SCHEMAS)


@pytest.mark.parametrize(
    "mechanism,extra,field",
    [
        ("local", {"env": {"API_TOKEN": "sk-live-123"}}, "config.local.env.API_TOKEN"),
        ("ssh", {"passphrase": "hunter2"}, "config.ssh.passphrase"),
        ("kubernetes", {"env": {"DB_PASSWORD": "hunter2"}}, "config.kubernetes.env.DB_PASSWORD"),
        ("github-actions", {"token": "ghp_abcdef"}, "config.githubActions.token"),
        ("webhook", {"headers": {"Authorization": "Bearer abc"}}, "config.webhook.headers.Authorization"),
    ],
)
def test_a_literal_secret_is_rejected(mechanism: str, extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        register(mechanism, {**MINIMAL[mechanism], **extra})
    assert err.value.field == field
    assert all(str(v) not in str(err.value) for v in (extra.get("env") or extra.get("headers") or extra).values())


@pytest.mark.parametrize(
    "mechanism,extra,field",
    [
        ("local", {"detached": "yes"}, "config.local.detached"),
        ("ssh", {"port": 70000}, "config.ssh.port"),
        ("kubernetes", {"namespace": "Not_A_Label"}, "config.kubernetes.namespace"),
        ("github-actions", {"repo": "no-slash"}, "config.githubActions.repo"),
        ("github-actions", {"inputs": {"weft_spinup_id": "x"}}, "config.githubActions.inputs.weft_spinup_id"),
        ("webhook", {"method": "PATCH"}, "config.webhook.method"),
        ("webhook", {"url": "ftp://x"}, "config.webhook.url"),
        ("webhook", {"args": "not a list"}, "config.webhook.args"),  # the checks every mechanism shares
    ],
)
def test_each_mechanisms_own_checks_run(mechanism: str, extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        register(mechanism, {**MINIMAL[mechanism], **extra})
    assert err.value.field == field


def test_checks_normalise_and_aliases_resolve() -> None:
    hook = register("webhook", {**MINIMAL["webhook"], "method": "put"})["config"]["webhook"]
    assert hook["method"] == "PUT"
    k8s = register("kubernetes", {**MINIMAL["kubernetes"], "command": "weft agent --x 'a b'"})
    assert k8s["config"]["kubernetes"]["command"] == ["weft", "agent", "--x", "a b"]
    gh = register("github-actions", {"repo": "acme/agents", "workflowFile": "agent.yml"})
    assert gh["config"]["githubActions"]["workflow"] == "agent.yml"
    assert "workflowFile" not in gh["config"]["githubActions"]


def test_another_mechanisms_block_is_ignored_and_a_mismatched_mechanism_refused() -> None:
    t = register("local", {"command": "x", "ssh": {"host": "h"}, "githubActions": {"repo": "a/b"}})
    assert t["config"] == {"mechanism": "local", "local": {**SCHEMAS["local"].defaults, "command": "x"}}
    with pytest.raises(InvalidInput) as err:
        register("local", {"mechanism": "ssh", "command": "x"})
    assert err.value.field == "config.mechanism"


@pytest.mark.parametrize("mechanism", list(MINIMAL))
def test_updates_merge_and_recheck(mechanism: str) -> None:
    key = SCHEMAS[mechanism].key
    current = register(mechanism, MINIMAL[mechanism])
    changes = validate_update(current, {"config": {"tags": ["ignored-by-mechanism"]}}, SCHEMAS)
    assert changes["config"][key]["tags"] == ["ignored-by-mechanism"]
    assert changes["registeredConfig"] == {**MINIMAL[mechanism], "tags": ["ignored-by-mechanism"]}
    required = SCHEMAS[mechanism].required[0]
    with pytest.raises(InvalidInput) as err:
        validate_update(current, {"config": {key: {required: ""}}}, SCHEMAS)
    assert err.value.field == f"config.{key}.{required}"


def test_validation_is_generic_over_the_schemas_it_is_given() -> None:
    seen: list[dict[str, Any]] = []
    schemas = {"carrier-pigeon": ConfigSchema(
        mechanism="carrier-pigeon", key="pigeon", required=("loft",), defaults={"birds": 1},
        aliases={"coop": "loft"}, check=seen.append)}
    t = validate_new_target(body("carrier-pigeon", {"coop": "north"}), schemas)
    assert t["config"] == {"mechanism": "carrier-pigeon", "pigeon": {"birds": 1, "loft": "north"}}
    assert seen == [{"birds": 1, "loft": "north"}]
    with pytest.raises(InvalidInput) as err:
        validate_new_target(body("local", {"command": "x"}), schemas)
    assert err.value.field == "mechanism"


def test_a_spin_up_request_reads_its_mechanisms_block() -> None:
    t = {**register("github-actions", MINIMAL["github-actions"]), "id": "tgt"}
    assert mechanism_config(t) is t["config"]["githubActions"]
    req = SpinUpRequest(spin_up_id="su", project="p", target=t, work=None, nats_url="nats://x")
    assert req.config["repo"] == "acme/agents"


# --- the one redact --------------------------------------------------------------------------------


def test_redact_masks_every_secret_longest_first() -> None:
    assert redact("token abcd and abcdef", ["abcd", "abcdef", ""]) == "token [redacted] and [redacted]"
    assert redact("x=s3cr3t", {"s3cr3t": "<env:S>"}) == "x=<env:S>"
    assert redact("nothing here", []) == "nothing here"


def test_local_redacts_resolved_references_only() -> None:
    env_cfg = {"API_KEY": "env:API_KEY", "MODE": "fast", "PIN": "env:PIN"}
    resolved = {"API_KEY": "sk-123456", "MODE": "fast", "PIN": "42"}
    text = "key sk-123456 mode fast pin 42"
    assert redact_env(text, env_cfg, resolved) == "key <env:API_KEY> mode fast pin 42"
    assert redact_env(text, None, resolved) == text
