"""Validation and normalisation of spin-up target definitions (pure).

Accepts both config shapes existing clients send: nested (`config.local.command`, the original
Weft) and flat (`config.command`, the Shuttle CLI). Stores the nested shape. Secrets must be
references (`env:NAME`, `file:PATH`, `secret:NAME` for a Kubernetes secret): a literal secret is
rejected, so none can ever reach an event or a response.
"""

from __future__ import annotations

import re
from typing import Any

from weft.errors import InvalidInput

MECHANISMS: dict[str, str] = {
    "local": "local",
    "ssh": "ssh",
    "kubernetes": "kubernetes",
    "github-actions": "githubActions",
    "webhook": "webhook",
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "local": ("command",),
    "ssh": ("host", "user", "command"),
    "kubernetes": ("namespace", "image"),
    "github-actions": ("repo", "workflow"),
    "webhook": ("url",),
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"args": [], "env": {}, "detached": True},
    "ssh": {"port": 22, "env": {}, "connectionTimeoutMs": 30000, "knownHosts": "default"},
    "kubernetes": {"jobNamePrefix": "weft-agent", "env": {}, "ttlSecondsAfterFinished": 600},
    "github-actions": {"ref": "main", "tokenEnvVar": "GITHUB_TOKEN", "inputs": {}, "startTimeoutMs": 5000},
    "webhook": {"method": "POST", "headers": {}, "successCodes": [200, 201, 202], "timeoutMs": 30000},
}
ALIASES: dict[str, dict[str, str]] = {"github-actions": {"workflowFile": "workflow"}}
DEFAULT_BOUNDARIES = ["corporate", "corporate-adjacent", "personal", "open-source"]
DEFAULT_HEALTH = {"enabled": True, "intervalMs": 300000, "timeoutMs": 10000}
IMMUTABLE = ("name", "agentType", "mechanism")
MUTABLE = (
    "description",
    "capabilities",
    "boundaries",
    "tags",
    "config",
    "healthCheck",
    "maxConcurrentAgents",
    "cooldownMs",
    "spinUpTimeoutMs",
    "circuitBreakerThreshold",
)

SECRET_KEY = re.compile(r"(secret|token|password|passwd|private_?key|privatekey|api_?key|authorization|credential)", re.I)
REFERENCE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/?\S+|secret:[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[A-Za-z0-9_.-]+)?)$")
# Fields whose value names where a secret is, and so are not secrets themselves.
REFERENCE_FIELDS = {"privateKeyPath", "tokenEnvVar", "imagePullSecret", "serviceAccount", "knownHosts"}


def _require_str_list(value: Any, field: str, *, non_empty: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInput(f"{field} must be a list of non-empty strings", field=field)
    if non_empty and not value:
        raise InvalidInput(f"{field} must not be empty", field=field)
    return list(dict.fromkeys(value))


def check_secrets(value: Any, path: str) -> None:
    """Reject literal secrets anywhere under a target's config: keys that name a secret must hold a
    reference, and so must any value that is itself a reference-looking field."""
    if isinstance(value, dict):
        for key, inner in value.items():
            sub = f"{path}.{key}"
            if key not in REFERENCE_FIELDS and SECRET_KEY.search(str(key)) and isinstance(inner, str):
                if not REFERENCE.match(inner):
                    raise InvalidInput(
                        f"{sub} looks like a secret: give a reference (env:NAME, file:PATH or "
                        "secret:NAME), never the value",
                        field=sub,
                    )
            check_secrets(inner, sub)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            check_secrets(inner, f"{path}[{i}]")


def normalise_config(mechanism: str, config: Any) -> dict[str, Any]:
    """Nested or flat config in, nested `{mechanism, <key>: {...}}` out, with defaults applied."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InvalidInput("config must be an object", field="config")
    key = MECHANISMS[mechanism]
    declared = config.get("mechanism")
    if declared is not None and declared != mechanism:
        raise InvalidInput(f"config.mechanism {declared!r} differs from mechanism {mechanism!r}", field="config.mechanism")
    nested = config.get(key)
    if nested is not None and not isinstance(nested, dict):
        raise InvalidInput(f"config.{key} must be an object", field=f"config.{key}")
    flat = {k: v for k, v in config.items() if k not in ("mechanism", key) and k not in MECHANISMS.values()}
    body: dict[str, Any] = {**DEFAULTS[mechanism], **flat, **(nested or {})}
    for alias, canonical in ALIASES.get(mechanism, {}).items():
        if alias in body and canonical not in body:
            body[canonical] = body.pop(alias)
    for name in REQUIRED[mechanism]:
        if not body.get(name):
            raise InvalidInput(f"config.{key}.{name} is required for mechanism {mechanism}", field=f"config.{key}.{name}")
    _check_mechanism_fields(mechanism, key, body)
    check_secrets(body, f"config.{key}")
    return {"mechanism": mechanism, key: body}


def _check_mechanism_fields(mechanism: str, key: str, body: dict[str, Any]) -> None:
    for name in ("env", "headers", "inputs"):
        if name in body and not isinstance(body[name], dict):
            raise InvalidInput(f"config.{key}.{name} must be an object", field=f"config.{key}.{name}")
    if "args" in body and not (isinstance(body["args"], list) and all(isinstance(a, str) for a in body["args"])):
        raise InvalidInput(f"config.{key}.args must be a list of strings", field=f"config.{key}.args")
    if mechanism == "webhook":
        if str(body.get("method", "")).upper() not in ("POST", "GET", "PUT"):
            raise InvalidInput("config.webhook.method must be POST, GET or PUT", field="config.webhook.method")
        body["method"] = str(body["method"]).upper()
        if not re.match(r"^https?://", str(body["url"])):
            raise InvalidInput("config.webhook.url must be an http(s) URL", field="config.webhook.url")
    if mechanism == "github-actions" and not re.match(r"^[\w.-]+/[\w.-]+$", str(body["repo"])):
        raise InvalidInput("config.githubActions.repo must be owner/name", field="config.githubActions.repo")
    if mechanism == "ssh" and not (isinstance(body.get("port"), int) and 0 < body["port"] < 65536):
        raise InvalidInput("config.ssh.port must be an integer port", field="config.ssh.port")


def _int_field(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{name} must be an integer >= {minimum}", field=name)
    return value


def _health(value: Any, base: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return dict(base)
    if not isinstance(value, dict):
        raise InvalidInput("healthCheck must be an object", field="healthCheck")
    merged = {**base, **value}
    if not isinstance(merged["enabled"], bool):
        raise InvalidInput("healthCheck.enabled must be a boolean", field="healthCheck.enabled")
    for name in ("intervalMs", "timeoutMs"):
        if isinstance(merged[name], bool) or not isinstance(merged[name], int) or merged[name] < 100:
            raise InvalidInput(f"healthCheck.{name} must be an integer >= 100", field=f"healthCheck.{name}")
    return merged


def validate_new_target(body: Any) -> dict[str, Any]:
    """A registration body in, the stored definition out (or InvalidInput naming the field)."""
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", field="body")
    name = body.get("name")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", name):
        raise InvalidInput("name is required: 1-128 of [A-Za-z0-9_.-], starting alphanumeric", field="name")
    agent_type = body.get("agentType")
    if not isinstance(agent_type, str) or not agent_type:
        raise InvalidInput("agentType is required", field="agentType")
    mechanism = body.get("mechanism")
    if mechanism not in MECHANISMS:
        raise InvalidInput(f"mechanism must be one of {', '.join(MECHANISMS)}", field="mechanism")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidInput("description must be a string", field="description")
    tags = _require_str_list(body.get("tags", []), "tags", non_empty=False)
    status = body.get("status", "available")
    if status not in ("available", "disabled"):
        raise InvalidInput("status must be available or disabled", field="status")
    return {
        "name": name,
        "description": description,
        "agentType": agent_type,
        "capabilities": _require_str_list(body.get("capabilities"), "capabilities", non_empty=True),
        "boundaries": _require_str_list(body.get("boundaries", DEFAULT_BOUNDARIES), "boundaries", non_empty=True),
        "mechanism": mechanism,
        "config": normalise_config(mechanism, body.get("config")),
        "healthCheck": _health(body.get("healthCheck"), DEFAULT_HEALTH),
        "maxConcurrentAgents": _int_field(body, "maxConcurrentAgents", 3, 1),
        "cooldownMs": _int_field(body, "cooldownMs", 30000, 0),
        "spinUpTimeoutMs": _int_field(body, "spinUpTimeoutMs", 60000, 100),
        "circuitBreakerThreshold": _int_field(body, "circuitBreakerThreshold", 3, 1),
        "tags": tags,
        "status": status,
        "registeredBy": body.get("registeredBy", "api") if body.get("registeredBy") in ("cli", "api", "agent", "config") else "api",
    }


def validate_update(current: dict[str, Any], updates: Any) -> dict[str, Any]:
    """The changed fields of a target update; config and healthCheck merge shallowly."""
    if not isinstance(updates, dict):
        raise InvalidInput("request body must be a JSON object", field="body")
    for name in IMMUTABLE:
        if name in updates and updates[name] != current.get(name):
            raise InvalidInput(f"{name} cannot be changed; remove and re-register the target", field=name)
    unknown = [k for k in updates if k not in MUTABLE and k not in IMMUTABLE and k not in ("id", "status")]
    if unknown:
        raise InvalidInput(f"{unknown[0]} is not an updatable field", field=unknown[0])
    changes: dict[str, Any] = {}
    if "description" in updates:
        if updates["description"] is not None and not isinstance(updates["description"], str):
            raise InvalidInput("description must be a string", field="description")
        changes["description"] = updates["description"]
    for name, non_empty in (("capabilities", True), ("boundaries", True), ("tags", False)):
        if name in updates:
            changes[name] = _require_str_list(updates[name], name, non_empty=non_empty)
    if "config" in updates:
        mechanism = current["mechanism"]
        key = MECHANISMS[mechanism]
        incoming = updates["config"]
        if not isinstance(incoming, dict):
            raise InvalidInput("config must be an object", field="config")
        inner = incoming.get(key, {k: v for k, v in incoming.items() if k != "mechanism"})
        merged = {**current["config"][key], **inner}
        changes["config"] = normalise_config(mechanism, {"mechanism": mechanism, key: merged})
    if "healthCheck" in updates:
        changes["healthCheck"] = _health(updates["healthCheck"], current["healthCheck"])
    for name, minimum in (("maxConcurrentAgents", 1), ("cooldownMs", 0), ("spinUpTimeoutMs", 100), ("circuitBreakerThreshold", 1)):
        if name in updates:
            changes[name] = _int_field(updates, name, 0, minimum)
    return changes
