"""Validation and normalisation of spin-up target definitions (pure).

Accepts both config shapes existing clients send: nested (`config.local.command`, the original
Weft) and flat (`config.command`, the Shuttle CLI). Stores the nested shape in `config` (what the
mechanisms read) and the client's own shape in `registeredConfig` (what GET answers as `config`, so
a client prints what it registered). Secrets must be
references (`env:NAME`, `file:PATH`, `secret:NAME` for a Kubernetes secret): a literal secret is
rejected, so none can ever reach an event or a response.

What is particular to one mechanism (its block's key, required fields, defaults, aliases, field
checks) is its `ConfigSchema`, defined beside the mechanism in weft/spinup/<mechanism>.py and
registered once in `weft.spinup.SCHEMAS`; the functions here take those schemas as an argument.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from weft.core.credentials import literal_credentials
from weft.core.errors import InvalidInput


@dataclass(frozen=True)
class ConfigSchema:
    """One mechanism's config: what `normalise_config` needs to know of it.

    `check` gets the merged body (defaults, flat and nested fields, aliases resolved, required
    fields present) and raises InvalidInput naming the field; it may normalise values in place."""

    mechanism: str  # the target's `mechanism`, e.g. "github-actions"
    key: str  # its block in nested config, e.g. "githubActions"
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> canonical field name
    check: Callable[[dict[str, Any]], None] | None = None


Schemas = Mapping[str, ConfigSchema]  # by mechanism name

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

def _require_str_list(value: Any, field: str, *, non_empty: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInput(f"{field} must be a list of non-empty strings", field=field)
    if non_empty and not value:
        raise InvalidInput(f"{field} must not be empty", field=field)
    return list(dict.fromkeys(value))


def check_secrets(value: Any, path: str) -> None:
    """Reject the first literal credential under `value` (weft.core.credentials), naming its field."""
    found = literal_credentials(value, path)
    if found:
        where, problem = found[0]
        raise InvalidInput(f"{where} {problem}", field=where)


def _schema(mechanism: str, schemas: Schemas) -> ConfigSchema:
    schema = schemas.get(mechanism)
    if schema is None:
        raise InvalidInput(f"mechanism must be one of {', '.join(schemas)}", field="mechanism")
    return schema


def _block_keys(schemas: Schemas) -> set[str]:
    return {s.key for s in schemas.values()}


def normalise_config(mechanism: str, config: Any, schemas: Schemas) -> dict[str, Any]:
    """Nested or flat config in, nested `{mechanism, <key>: {...}}` out, with defaults applied."""
    schema = _schema(mechanism, schemas)
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InvalidInput("config must be an object", field="config")
    key = schema.key
    declared = config.get("mechanism")
    if declared is not None and declared != mechanism:
        raise InvalidInput(f"config.mechanism {declared!r} differs from mechanism {mechanism!r}", field="config.mechanism")
    nested = config.get(key)
    if nested is not None and not isinstance(nested, dict):
        raise InvalidInput(f"config.{key} must be an object", field=f"config.{key}")
    blocks = _block_keys(schemas)
    flat = {k: v for k, v in config.items() if k not in ("mechanism", key) and k not in blocks}
    body: dict[str, Any] = {**copy.deepcopy(dict(schema.defaults)), **flat, **(nested or {})}
    for alias, canonical in schema.aliases.items():
        if alias in body and canonical not in body:
            body[canonical] = body.pop(alias)
    for name in schema.required:
        if not body.get(name):
            raise InvalidInput(f"config.{key}.{name} is required for mechanism {mechanism}", field=f"config.{key}.{name}")
    _check_common_fields(key, body)
    if schema.check is not None:
        schema.check(body)
    check_secrets(body, f"config.{key}")
    return {"mechanism": mechanism, key: body}


def registered_config(mechanism: str, config: Any, schemas: Schemas) -> dict[str, Any]:
    """The config in the shape the client sent it (flat or nested), without the blocks of other
    mechanisms that normalisation ignores too. Call after `normalise_config` accepted `config`:
    every value here was checked for literal secrets there; checked again, to be sure."""
    if not isinstance(config, dict):
        return {}
    key = _schema(mechanism, schemas).key
    blocks = _block_keys(schemas)
    shown = {k: v for k, v in config.items() if k in ("mechanism", key) or k not in blocks}
    check_secrets(shown, "config")
    return shown


def merge_registered(
    mechanism: str, registered: dict[str, Any], incoming: dict[str, Any], schemas: Schemas
) -> dict[str, Any]:
    """An update's config merged (shallowly, like the normalised one) into the registered shape."""
    key = _schema(mechanism, schemas).key
    inner = incoming.get(key, {k: v for k, v in incoming.items() if k != "mechanism"})
    if isinstance(registered.get(key), dict):
        return {**registered, key: {**registered[key], **inner}}
    return {**registered, **inner}


def _check_common_fields(key: str, body: dict[str, Any]) -> None:
    """What every mechanism's fields of these names must be."""
    for name in ("env", "headers", "inputs"):
        if name in body and not isinstance(body[name], dict):
            raise InvalidInput(f"config.{key}.{name} must be an object", field=f"config.{key}.{name}")
    if "args" in body and not (isinstance(body["args"], list) and all(isinstance(a, str) for a in body["args"])):
        raise InvalidInput(f"config.{key}.args must be a list of strings", field=f"config.{key}.args")


# --- field checks the mechanisms' schemas share (messages never echo a value) ----------------------

RESOLVABLE_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:\S+)$")
POSIX_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def fail(key: str, name: str, why: str) -> InvalidInput:
    """InvalidInput for `config.<key>.<name>`, naming that field."""
    return InvalidInput(f"config.{key}.{name} {why}", field=f"config.{key}.{name}")


def opt_int(body: dict[str, Any], key: str, name: str, minimum: int) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise fail(key, name, f"must be an integer >= {minimum}")


def opt_str(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not (isinstance(body[name], str) and body[name]):
        raise fail(key, name, "must be a non-empty string")


def opt_url(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not re.match(r"^https?://[^\s/]+", str(body[name])):
        raise fail(key, name, "must be an http(s) URL")


def opt_bool(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], bool):
        raise fail(key, name, "must be a boolean")


def opt_resolvable_ref(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not RESOLVABLE_REF.match(str(body[name])):
        raise fail(key, name, "must be a reference weft can resolve: env:NAME or file:PATH (never the value)")


def opt_template(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], str | dict | list):
        raise fail(key, name, "must be a string or a JSON object/array")


def check_process_fields(body: dict[str, Any], key: str) -> None:
    """What local and ssh share: a command line, a working directory, env, log dir, stop grace."""
    if not isinstance(body["command"], str):
        raise fail(key, "command", "must be a command line (a string)")
    try:
        shlex.split(body["command"])
    except ValueError:
        raise fail(key, "command", "does not parse as a shell word list") from None
    for name, value in (body.get("env") or {}).items():
        if not POSIX_ENV_NAME.match(str(name)):
            raise fail(key, f"env.{name}", "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if not isinstance(value, str | int | float | bool):
            raise fail(key, f"env.{name}", "must be a string, number or boolean")
        if isinstance(value, str) and value.startswith("secret:"):
            raise fail(key, f"env.{name}", "must be env:NAME or file:PATH: secret: names a Kubernetes secret")
    for name in ("workingDirectory", "logDir"):
        opt_str(body, key, name)
    opt_int(body, key, "stopGraceMs", 0)


# --- the target around the config ------------------------------------------------------------------


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


def validate_new_target(body: Any, schemas: Schemas) -> dict[str, Any]:
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
    if not isinstance(mechanism, str) or mechanism not in schemas:
        raise InvalidInput(f"mechanism must be one of {', '.join(schemas)}", field="mechanism")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidInput("description must be a string", field="description")
    tags = _require_str_list(body.get("tags", []), "tags", non_empty=False)
    status = body.get("status", "available")
    if status not in ("available", "disabled"):
        raise InvalidInput("status must be available or disabled", field="status")
    definition = {
        "name": name,
        "description": description,
        "agentType": agent_type,
        "capabilities": _require_str_list(body.get("capabilities"), "capabilities", non_empty=True),
        "boundaries": _require_str_list(body.get("boundaries", DEFAULT_BOUNDARIES), "boundaries", non_empty=True),
        "mechanism": mechanism,
        "config": normalise_config(mechanism, body.get("config"), schemas),
        "registeredConfig": registered_config(mechanism, body.get("config"), schemas),
        "healthCheck": _health(body.get("healthCheck"), DEFAULT_HEALTH),
        "maxConcurrentAgents": _int_field(body, "maxConcurrentAgents", 3, 1),
        "cooldownMs": _int_field(body, "cooldownMs", 30000, 0),
        "spinUpTimeoutMs": _int_field(body, "spinUpTimeoutMs", 60000, 100),
        "circuitBreakerThreshold": _int_field(body, "circuitBreakerThreshold", 3, 1),
        "tags": tags,
        "status": status,
        "registeredBy": body.get("registeredBy", "api") if body.get("registeredBy") in ("cli", "api", "agent", "config") else "api",
    }
    check_secrets({k: v for k, v in definition.items() if k not in ("config", "registeredConfig")}, "")
    return definition


def validate_update(current: dict[str, Any], updates: Any, schemas: Schemas) -> dict[str, Any]:
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
        key = _schema(mechanism, schemas).key
        incoming = updates["config"]
        if not isinstance(incoming, dict):
            raise InvalidInput("config must be an object", field="config")
        inner = incoming.get(key, {k: v for k, v in incoming.items() if k != "mechanism"})
        if not isinstance(inner, dict):
            raise InvalidInput(f"config.{key} must be an object", field=f"config.{key}")
        merged = {**current["config"][key], **inner}
        changes["config"] = normalise_config(mechanism, {"mechanism": mechanism, key: merged}, schemas)
        registered = current.get("registeredConfig")
        if isinstance(registered, dict):  # targets registered before weft kept the client's shape lack it
            changes["registeredConfig"] = registered_config(
                mechanism, merge_registered(mechanism, registered, incoming, schemas), schemas
            )
    if "healthCheck" in updates:
        changes["healthCheck"] = _health(updates["healthCheck"], current["healthCheck"])
    for name, minimum in (("maxConcurrentAgents", 1), ("cooldownMs", 0), ("spinUpTimeoutMs", 100), ("circuitBreakerThreshold", 1)):
        if name in updates:
            changes[name] = _int_field(updates, name, 0, minimum)
    check_secrets({k: v for k, v in changes.items() if k not in ("config", "registeredConfig")}, "")
    return changes
