"""Validation and normalisation of spin-up target definitions (pure).

Accepts both config shapes existing clients send: nested (`config.local.command`, the original
Weft) and flat (`config.command`, the Shuttle CLI). Stores the nested shape in `config` (what the
mechanisms read) and the client's own shape in `registeredConfig` (what GET answers as `config`, so
a client prints what it registered). Secrets must be
references (`env:NAME`, `file:PATH`, `secret:NAME` for a Kubernetes secret): a literal secret is
rejected, so none can ever reach an event or a response.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from weft.core.errors import InvalidInput

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
    "kubernetes": ("image",),
    "github-actions": ("repo", "workflow"),
    "webhook": ("url",),
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"args": [], "env": {}, "detached": True},
    "ssh": {"port": 22, "env": {}, "connectionTimeoutMs": 30000, "knownHosts": "default"},
    # No namespace means `default`, as kubectl has it (Shuttle has no Kubernetes flags at all).
    "kubernetes": {"namespace": "default", "jobNamePrefix": "weft-agent", "env": {}, "ttlSecondsAfterFinished": 600},
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

SECRET_KEY = re.compile(r"(secret|token|password|passwd|passphrase|private_?key|privatekey|api_?key|authorization|credential)", re.I)
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


def registered_config(mechanism: str, config: Any) -> dict[str, Any]:
    """The config in the shape the client sent it (flat or nested), without the blocks of other
    mechanisms that normalisation ignores too. Call after `normalise_config` accepted `config`:
    every value here was checked for literal secrets there; checked again, to be sure."""
    if not isinstance(config, dict):
        return {}
    key = MECHANISMS[mechanism]
    shown = {k: v for k, v in config.items() if k in ("mechanism", key) or k not in MECHANISMS.values()}
    check_secrets(shown, "config")
    return shown


def merge_registered(mechanism: str, registered: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
    """An update's config merged (shallowly, like the normalised one) into the registered shape."""
    key = MECHANISMS[mechanism]
    inner = incoming.get(key, {k: v for k, v in incoming.items() if k != "mechanism"})
    if isinstance(registered.get(key), dict):
        return {**registered, key: {**registered[key], **inner}}
    return {**registered, **inner}


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
    if mechanism in REMOTE_CHECKS:
        REMOTE_CHECKS[mechanism](body)


# --- kubernetes, github-actions, webhook: optional fields (messages never echo a value) --------------

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
K8S_SECRET_REF = re.compile(r"^secret:[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[-._a-zA-Z0-9]+)?$")
RESOLVABLE_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:\S+)$")
WEFT_INPUTS = ("weft_spinup_id", "weft_work_id", "weft_nats_url", "weft_project")


def _fail(key: str, name: str, why: str) -> InvalidInput:
    return InvalidInput(f"config.{key}.{name} {why}", field=f"config.{key}.{name}")


def _opt_int(body: dict[str, Any], key: str, name: str, minimum: int) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise _fail(key, name, f"must be an integer >= {minimum}")


def _opt_str(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not (isinstance(body[name], str) and body[name]):
        raise _fail(key, name, "must be a non-empty string")


def _opt_url(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not re.match(r"^https?://[^\s/]+", str(body[name])):
        raise _fail(key, name, "must be an http(s) URL")


def _opt_bool(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], bool):
        raise _fail(key, name, "must be a boolean")


def _opt_resolvable_ref(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not RESOLVABLE_REF.match(str(body[name])):
        raise _fail(key, name, "must be a reference weft can resolve: env:NAME or file:PATH (never the value)")


def _opt_template(body: dict[str, Any], key: str, name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], str | dict | list):
        raise _fail(key, name, "must be a string or a JSON object/array")


def _check_kubernetes(body: dict[str, Any]) -> None:
    key = "kubernetes"
    if not (isinstance(body["namespace"], str) and DNS_LABEL.match(body["namespace"]) and len(body["namespace"]) <= 63):
        raise _fail(key, "namespace", "must be a DNS label: lowercase alphanumerics and '-', at most 63")
    prefix = body.get("jobNamePrefix")
    if not (isinstance(prefix, str) and DNS_LABEL.match(prefix) and len(prefix) <= 54):
        raise _fail(key, "jobNamePrefix", "must be lowercase alphanumerics and '-', at most 54 (9 are added)")
    _opt_str(body, key, "image")
    if isinstance(body.get("command"), str):
        try:
            body["command"] = shlex.split(body["command"])
        except ValueError:
            raise _fail(key, "command", "does not parse as a shell word list") from None
    if "command" in body and not (isinstance(body["command"], list) and all(isinstance(a, str) for a in body["command"])):
        raise _fail(key, "command", "must be a list of strings")
    for name, value in (body.get("env") or {}).items():
        if not ENV_NAME.match(str(name)):
            raise _fail(key, f"env.{name}", "is not a valid environment variable name")
        if not isinstance(value, str | int | float | bool):
            raise _fail(key, f"env.{name}", "must be a string, number or boolean")
        if isinstance(value, str) and value.startswith("secret:") and not K8S_SECRET_REF.match(value):
            raise _fail(key, f"env.{name}", "must be secret:NAME or secret:NAME/KEY")
    res = body.get("resources")
    if res is not None:
        parts = [res.get("requests") or {}, res.get("limits") or {}] if isinstance(res, dict) and (
            "requests" in res or "limits" in res) else [res]
        if not all(isinstance(p, dict) and all(isinstance(q, str | int | float) and not isinstance(q, bool)
                                               for q in p.values()) for p in parts):
            raise _fail(key, "resources", "must be {cpu, memory} (or {requests, limits}) with quantity values")
    pull = body.get("imagePullSecret")
    if pull is not None and not (isinstance(pull, str) and pull) and not (
            isinstance(pull, list) and all(isinstance(p, str) and p for p in pull)):
        raise _fail(key, "imagePullSecret", "must be a secret name or a list of them")
    if body.get("imagePullPolicy") is not None and body["imagePullPolicy"] not in ("Always", "IfNotPresent", "Never"):
        raise _fail(key, "imagePullPolicy", "must be Always, IfNotPresent or Never")
    for name in ("serviceAccount", "caCertPath", "kubeconfig", "context"):
        _opt_str(body, key, name)
    _opt_int(body, key, "ttlSecondsAfterFinished", 0)
    _opt_int(body, key, "activeDeadlineSeconds", 1)
    _opt_int(body, key, "requestTimeoutMs", 100)
    _opt_url(body, key, "apiServer")
    _opt_resolvable_ref(body, key, "tokenRef")
    _opt_bool(body, key, "insecureSkipTlsVerify")


def _check_github(body: dict[str, Any]) -> None:
    key = "githubActions"
    workflow = body["workflow"]
    if isinstance(workflow, bool) or not isinstance(workflow, str | int):
        raise _fail(key, "workflow", "must be a workflow file name or id")
    _opt_str(body, key, "ref")
    if body.get("tokenEnvVar") is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(body["tokenEnvVar"])):
        raise _fail(key, "tokenEnvVar", "must be an environment variable name")
    _opt_resolvable_ref(body, key, "token")
    _opt_url(body, key, "apiUrl")
    _opt_int(body, key, "startTimeoutMs", 0)
    _opt_int(body, key, "requestTimeoutMs", 100)
    _opt_bool(body, key, "returnRunDetails")
    for name, value in (body.get("inputs") or {}).items():
        if name in WEFT_INPUTS:
            raise _fail(key, f"inputs.{name}", "is set by weft for each spin-up")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise _fail(key, f"inputs.{name}", "must be a string, number or boolean (inputs are sent as strings)")


def _check_webhook(body: dict[str, Any]) -> None:
    key = "webhook"
    codes = body.get("successCodes")
    if not (isinstance(codes, list) and codes and all(
            isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes)):
        raise _fail(key, "successCodes", "must be a non-empty list of HTTP status codes")
    _opt_int(body, key, "timeoutMs", 100)
    for name, value in (body.get("headers") or {}).items():
        if not HEADER_NAME.match(str(name)):
            raise _fail(key, f"headers.{name}", "is not a valid header name")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise _fail(key, f"headers.{name}", "must be a string")
        if isinstance(value, str) and value.startswith("secret:"):
            raise _fail(key, f"headers.{name}", "must be env:NAME or file:PATH: secret: names a Kubernetes secret")
    _opt_template(body, key, "bodyTemplate")
    _opt_template(body, key, "stopBodyTemplate")
    _opt_url(body, key, "stopUrl")
    if body.get("stopMethod") is not None:
        if str(body["stopMethod"]).upper() not in ("POST", "PUT", "DELETE", "GET"):
            raise _fail(key, "stopMethod", "must be POST, PUT, DELETE or GET")
        body["stopMethod"] = str(body["stopMethod"]).upper()
    check = body.get("healthCheck")
    if check is not None:
        if not isinstance(check, dict):
            raise _fail(key, "healthCheck", "must be an object {url?, method: HEAD|GET}")
        _opt_url(check, f"{key}.healthCheck", "url")
        method = str(check.get("method") or "HEAD").upper()
        if method not in ("HEAD", "GET"):
            raise _fail(key, "healthCheck.method", "must be HEAD or GET")
        body["healthCheck"] = {**check, "method": method}


REMOTE_CHECKS = {"kubernetes": _check_kubernetes, "github-actions": _check_github, "webhook": _check_webhook}


# --- local, ssh: optional fields -------------------------------------------------------------------

POSIX_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_process_fields(body: dict[str, Any], key: str) -> None:
    """What local and ssh share: a command line, a working directory, env, log dir, stop grace."""
    if not isinstance(body["command"], str):
        raise _fail(key, "command", "must be a command line (a string)")
    try:
        shlex.split(body["command"])
    except ValueError:
        raise _fail(key, "command", "does not parse as a shell word list") from None
    for name, value in (body.get("env") or {}).items():
        if not POSIX_ENV_NAME.match(str(name)):
            raise _fail(key, f"env.{name}", "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if not isinstance(value, str | int | float | bool):
            raise _fail(key, f"env.{name}", "must be a string, number or boolean")
        if isinstance(value, str) and value.startswith("secret:"):
            raise _fail(key, f"env.{name}", "must be env:NAME or file:PATH: secret: names a Kubernetes secret")
    for name in ("workingDirectory", "logDir"):
        _opt_str(body, key, name)
    _opt_int(body, key, "stopGraceMs", 0)


def _check_local(body: dict[str, Any]) -> None:
    _check_process_fields(body, "local")
    _opt_bool(body, "local", "detached")


def _check_ssh(body: dict[str, Any]) -> None:
    key = "ssh"
    _check_process_fields(body, key)
    for name in ("host", "user", "privateKeyPath"):
        _opt_str(body, key, name)
    _opt_resolvable_ref(body, key, "privateKey")
    _opt_resolvable_ref(body, key, "passphrase")
    _opt_str(body, key, "knownHosts")  # default | accept-new | insecure | a known_hosts file path
    _opt_int(body, key, "connectionTimeoutMs", 100)


REMOTE_CHECKS.update({"local": _check_local, "ssh": _check_ssh})


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
        "registeredConfig": registered_config(mechanism, body.get("config")),
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
        if not isinstance(inner, dict):
            raise InvalidInput(f"config.{key} must be an object", field=f"config.{key}")
        merged = {**current["config"][key], **inner}
        changes["config"] = normalise_config(mechanism, {"mechanism": mechanism, key: merged})
        registered = current.get("registeredConfig")
        if isinstance(registered, dict):  # targets registered before weft kept the client's shape lack it
            changes["registeredConfig"] = registered_config(mechanism, merge_registered(mechanism, registered, incoming))
    if "healthCheck" in updates:
        changes["healthCheck"] = _health(updates["healthCheck"], current["healthCheck"])
    for name, minimum in (("maxConcurrentAgents", 1), ("cooldownMs", 0), ("spinUpTimeoutMs", 100), ("circuitBreakerThreshold", 1)):
        if name in updates:
            changes[name] = _int_field(updates, name, 0, minimum)
    return changes
