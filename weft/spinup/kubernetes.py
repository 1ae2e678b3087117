"""The `kubernetes` mechanism: one batch/v1 Job per spin-up, created through the Kubernetes API.

The official client (`kubernetes` 37, `BatchV1Api`) is synchronous (urllib3), so every call runs in
a worker thread (`asyncio.to_thread`) with a request timeout; nothing blocks the event loop.

Connection, from the target's `config.kubernetes`:
- `apiServer` (URL) with `tokenRef` (`env:NAME` or `file:PATH`, a bearer token resolved at each use)
  and `caCertPath` or `insecureSkipTlsVerify`;
- without `apiServer`: the pod's service account when running in a cluster, else the kubeconfig
  (`kubeconfig` path, default `~/.kube/config`, and `context`); `tokenRef` still overrides the token.

RBAC the identity needs in `namespace`: jobs `create` (launch), `get` (an idempotent relaunch of the
same spin-up), `delete` (stop) and `list` (probe).

The Job is named `<jobNamePrefix>-<8 hex of the spin-up id>`, so a retried launch of one spin-up
finds its Job instead of starting a second agent. Container env: the target's `env` (plain values;
`secret:NAME/KEY` becomes a `secretKeyRef`, `secret:NAME` uses the variable's own name as the key;
`env:`/`file:` references are resolved on the coordinator and land in the Job spec as plain values,
readable by anyone who may read Jobs in the namespace: prefer `secret:`), then the agent's
`WEFT_*`/`NATS_URL` variables, which win on a name clash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from weft.core.credentials import secret_named
from weft.core.errors import invalid_field
from weft.core.targets import (
    ConfigSchema,
    fail,
    opt_bool,
    opt_int,
    opt_resolvable_ref,
    opt_str,
    opt_url,
)
from weft.spinup.base import (
    Launched,
    ProbeResult,
    SpinUpError,
    SpinUpRequest,
    Stopwatch,
    redact,
    resolve_secret,
)
from weft.stamps import utc_now

if TYPE_CHECKING:  # the client is imported where used (it is slow to import): the schema needs none of it
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

T = TypeVar("T")

DEFAULT_REQUEST_TIMEOUT_MS = 30000
DEFAULT_PROBE_TIMEOUT_MS = 10000
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MESSAGE_LIMIT = 300
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
K8S_SECRET_REF = re.compile(r"^secret:[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[-._a-zA-Z0-9]+)?$")


# --- config (pure) ---------------------------------------------------------------------------------


def _check_config(body: dict[str, Any]) -> None:
    key = SCHEMA.key
    if not (isinstance(body["namespace"], str) and DNS_LABEL.match(body["namespace"]) and len(body["namespace"]) <= 63):
        raise fail(key, "namespace", "must be a DNS label: lowercase alphanumerics and '-', at most 63")
    prefix = body.get("jobNamePrefix")
    if not (isinstance(prefix, str) and DNS_LABEL.match(prefix) and len(prefix) <= 54):
        raise fail(key, "jobNamePrefix", "must be lowercase alphanumerics and '-', at most 54 (9 are added)")
    opt_str(body, key, "image")
    if isinstance(body.get("command"), str):
        try:
            body["command"] = shlex.split(body["command"])
        except ValueError:
            raise fail(key, "command", "does not parse as a shell word list") from None
    if "command" in body and not (isinstance(body["command"], list) and all(isinstance(a, str) for a in body["command"])):
        raise fail(key, "command", "must be a list of strings")
    for name, value in (body.get("env") or {}).items():
        if not ENV_NAME.match(str(name)):
            raise fail(key, f"env.{name}", "is not a valid environment variable name")
        if not isinstance(value, str | int | float | bool):
            raise fail(key, f"env.{name}", "must be a string, number or boolean")
        if isinstance(value, str) and value.startswith("secret:") and not K8S_SECRET_REF.match(value):
            raise fail(key, f"env.{name}", "must be secret:NAME or secret:NAME/KEY")
    res = body.get("resources")
    if res is not None:
        parts = [res.get("requests") or {}, res.get("limits") or {}] if isinstance(res, dict) and (
            "requests" in res or "limits" in res) else [res]
        if not all(isinstance(p, dict) and all(isinstance(q, str | int | float) and not isinstance(q, bool)
                                               for q in p.values()) for p in parts):
            raise fail(key, "resources", "must be {cpu, memory} (or {requests, limits}) with quantity values")
    pull = body.get("imagePullSecret")
    if pull is not None and not (isinstance(pull, str) and pull) and not (
            isinstance(pull, list) and all(isinstance(p, str) and p for p in pull)):
        raise fail(key, "imagePullSecret", "must be a secret name or a list of them")
    if body.get("imagePullPolicy") is not None and body["imagePullPolicy"] not in ("Always", "IfNotPresent", "Never"):
        raise fail(key, "imagePullPolicy", "must be Always, IfNotPresent or Never")
    for name in ("serviceAccount", "caCertPath", "kubeconfig", "context"):
        opt_str(body, key, name)
    opt_int(body, key, "ttlSecondsAfterFinished", 0)
    opt_int(body, key, "activeDeadlineSeconds", 1)
    opt_int(body, key, "requestTimeoutMs", 100)
    opt_url(body, key, "apiServer")
    opt_resolvable_ref(body, key, "tokenRef")
    opt_bool(body, key, "insecureSkipTlsVerify")


SCHEMA = ConfigSchema(
    mechanism="kubernetes",
    key="kubernetes",
    required=("image",),
    # No namespace means `default`, as kubectl has it (Shuttle has no Kubernetes flags at all).
    defaults={"namespace": "default", "jobNamePrefix": "weft-agent", "env": {}, "ttlSecondsAfterFinished": 600},
    check=_check_config,
)


# --- the Job (pure) -------------------------------------------------------------------------------


def short_id(spin_up_id: str) -> str:
    """8 hex characters of the spin-up id: the uuid4's own first 8, else a digest of the id."""
    try:
        parsed = uuid.UUID(spin_up_id)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.version == 4:
        return parsed.hex[:8]
    return hashlib.sha256(spin_up_id.encode()).hexdigest()[:8]


def job_name(prefix: str, spin_up_id: str) -> str:
    return f"{prefix}-{short_id(spin_up_id)}"


def label_value(value: str) -> str:
    """`value` if it is a valid label value (≤63 chars, alphanumeric ends, `-_.` inside), else a
    readable cleaned prefix plus 8 hex of its digest (the full value goes into an annotation)."""
    if len(value) <= 63 and LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:54].strip("-_.")
    return f"{cleaned}-{digest}" if cleaned else digest


def env_entry(name: str, value: Any, secrets: list[str]) -> dict[str, Any]:
    """One container env entry; resolved `env:`/`file:` values are appended to `secrets`."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = value if isinstance(value, str) else json.dumps(value)
    if text.startswith("secret:"):
        secret, _, key = text[len("secret:") :].partition("/")
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key or name}}}
    if text.startswith(("env:", "file:")):
        resolved = resolve_secret(text)
        secrets.append(resolved)
        return {"name": name, "value": resolved}
    return {"name": name, "value": text}


def container_env(configured: dict[str, Any], agent: dict[str, str], secrets: list[str]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for name, value in configured.items():
        merged[name] = env_entry(name, value, secrets)
    for name, value in agent.items():
        # The agent's NATS password or token stays out of the Job spec when the target names a
        # Kubernetes secret for it; otherwise weft's value is what the agent must use.
        if secret_named(name) and "valueFrom" in merged.get(name, {}):
            continue
        merged[name] = {"name": name, "value": value}
    return list(merged.values())


def resources(spec: Any) -> dict[str, Any] | None:
    """`{cpu, memory}` → requests = limits (a guaranteed pod); `{requests, limits}` passes through."""
    if not spec:
        return None
    if "requests" in spec or "limits" in spec:
        return {k: {r: str(q) for r, q in v.items()} for k, v in spec.items() if k in ("requests", "limits") and v}
    amounts = {r: str(q) for r, q in spec.items() if q is not None}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def job_manifest(req: SpinUpRequest, created_at: str, secrets: list[str] | None = None) -> dict[str, Any]:
    """The batch/v1 Job for one spin-up, as the API server receives it."""
    cfg = req.config
    target = req.target
    name = job_name(cfg["jobNamePrefix"], req.spin_up_id)
    labels = {
        "app.kubernetes.io/name": "weft-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "weft",
        "weft.dev/target-id": label_value(target["id"]),
        "weft.dev/spin-up-id": label_value(req.spin_up_id),
        "weft.dev/project": label_value(req.project),
        "weft.dev/agent-type": label_value(target["agentType"]),
    }
    annotations = {
        "weft.dev/target-name": target["name"],
        "weft.dev/created-at": created_at,
        "weft.dev/spin-up-id": req.spin_up_id,
        "weft.dev/project": req.project,
    }
    if req.work is not None:
        annotations["weft.dev/work-id"] = req.work["id"]
    container: dict[str, Any] = {
        "name": "agent",
        "image": cfg["image"],
        "env": container_env(cfg.get("env") or {}, req.agent_env(), [] if secrets is None else secrets),
    }
    if cfg.get("imagePullPolicy"):
        container["imagePullPolicy"] = cfg["imagePullPolicy"]
    if cfg.get("command"):
        container["command"] = list(cfg["command"])
    if cfg.get("args"):
        container["args"] = list(cfg["args"])
    limits = resources(cfg.get("resources"))
    if limits:
        container["resources"] = limits
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    account = cfg.get("serviceAccount") or cfg.get("serviceAccountName")
    if account:
        pod["serviceAccountName"] = account
    pull = cfg.get("imagePullSecret")
    if pull:
        pod["imagePullSecrets"] = [{"name": n} for n in ([pull] if isinstance(pull, str) else pull)]
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod},
    }
    if cfg.get("ttlSecondsAfterFinished") is not None:
        spec["ttlSecondsAfterFinished"] = cfg["ttlSecondsAfterFinished"]
    if cfg.get("activeDeadlineSeconds") is not None:
        spec["activeDeadlineSeconds"] = cfg["activeDeadlineSeconds"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": cfg["namespace"], "labels": labels, "annotations": annotations},
        "spec": spec,
    }


# --- the connection (sync: runs in the worker thread) ------------------------------------------------


def client_configuration(cfg: dict[str, Any]) -> k8s.Configuration:
    """A fresh client Configuration for this target (never the process-wide default)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    conf = k8s.Configuration()
    if cfg.get("apiServer"):
        conf.host = str(cfg["apiServer"]).rstrip("/")
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            try:
                kubeconfig = cfg.get("kubeconfig")
                if isinstance(kubeconfig, str) and kubeconfig.startswith("env:"):
                    # The variable holds the kubeconfig itself (its credentials): never a file of ours.
                    import yaml

                    k8s_config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
                        yaml.safe_load(resolve_secret(kubeconfig)), context=cfg.get("context"),
                        client_configuration=conf, persist_config=False,
                    )
                else:
                    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                        # `file:PATH` (the field holds credentials, so it is a reference) is that path.
                        config_file=kubeconfig.removeprefix("file:") if isinstance(kubeconfig, str) else None,
                        context=cfg.get("context"),
                        client_configuration=conf,
                        persist_config=False,
                    )
            except Exception as err:  # missing file, bad YAML, failing exec plugin: all "no kubeconfig"
                raise SpinUpError(
                    f"no Kubernetes connection: not running in a cluster, and the kubeconfig failed ({err}); "
                    "set config.kubernetes.apiServer"
                ) from None
    if cfg.get("tokenRef"):
        conf.api_key = {"BearerToken": resolve_secret(cfg["tokenRef"])}
        conf.api_key_prefix = {"BearerToken": "Bearer"}
        conf.refresh_api_key_hook = None
    if cfg.get("caCertPath"):
        conf.ssl_ca_cert = cfg["caCertPath"]
    if cfg.get("insecureSkipTlsVerify"):
        conf.verify_ssl = False
    return conf


def api_error(err: ApiException) -> str:
    """The API server's own message (its Status object), bounded."""
    message = None
    if err.body:
        try:
            body = json.loads(err.body)
        except (TypeError, ValueError):
            body = None
        if isinstance(body, dict):
            message = body.get("message")
        if message is None:
            message = str(err.body)
    text = f"Kubernetes API {err.status} {err.reason or ''}".rstrip()
    return f"{text}: {message[:MESSAGE_LIMIT]}" if message else text


class KubernetesMechanism:
    name = SCHEMA.mechanism
    requires = ("kubernetes.client", "urllib3")  # what build_mechanisms imports before offering this mechanism

    async def _call(self, cfg: dict[str, Any], fn: Callable[[k8s.BatchV1Api], T], secrets: list[str]) -> T:
        """Run `fn` against a fresh BatchV1Api in a worker thread; every failure becomes SpinUpError."""
        import urllib3
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException
        from pydantic import ValidationError

        def run() -> T:
            conf = client_configuration(cfg)
            for value in conf.api_key.values():  # tokenRef's, or a kubeconfig's (as "Bearer <token>")
                secrets.extend([str(value), str(value).removeprefix("Bearer ")])
            with k8s.ApiClient(conf) as api:
                return fn(k8s.BatchV1Api(api))

        try:
            return await asyncio.to_thread(run)
        except urllib3.exceptions.HTTPError as err:
            raise SpinUpError(redact(f"Kubernetes API unreachable: {err}", secrets)[:500]) from None
        except ValidationError as err:
            where, message = invalid_field(err)
            raise SpinUpError(f"the Job does not validate: {where}: {message}") from None
        except (SpinUpError, ApiException):
            raise
        except Exception as err:  # e.g. an unreadable caCertPath: the fleet expects SpinUpError
            raise SpinUpError(redact(f"Kubernetes client: {type(err).__name__}: {err}", secrets)[:500]) from None

    @staticmethod
    def _timeout(cfg: dict[str, Any]) -> float:
        return int(cfg.get("requestTimeoutMs") or DEFAULT_REQUEST_TIMEOUT_MS) / 1000

    async def launch(self, req: SpinUpRequest) -> Launched:
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        cfg = req.config
        secrets: list[str] = []
        manifest = job_manifest(req, utc_now(), secrets)
        namespace, name = cfg["namespace"], manifest["metadata"]["name"]
        timeout = self._timeout(cfg)

        def create(api: k8s.BatchV1Api) -> k8s.V1Job:
            body = k8s.V1Job.model_validate(manifest)
            try:
                # (`_content_type` is ignored by this generated client; the header is set directly.)
                return api.create_namespaced_job(
                    namespace, body, _request_timeout=timeout, _headers={"Content-Type": "application/json"}
                )
            except ApiException as err:
                if err.status != 409:
                    raise
                existing = api.read_namespaced_job(name, namespace, _request_timeout=timeout)
                labels = (existing.metadata.labels if existing.metadata else None) or {}
                mine = labels.get("weft.dev/spin-up-id")
                if mine != manifest["metadata"]["labels"]["weft.dev/spin-up-id"]:
                    raise
                return existing  # this spin-up's Job, created by an earlier attempt

        try:
            job = await self._call(cfg, create, secrets)
        except ApiException as err:
            raise SpinUpError(redact(f"creating Job {namespace}/{name}: {api_error(err)}", secrets)) from None
        uid = job.metadata.uid if job.metadata is not None else None
        return Launched(handle={"namespace": namespace, "jobName": name, "uid": uid})

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        """Delete the Job; its pod goes with it (Background propagation: SIGTERM, then the pod's
        termination grace period). A Job already gone is fine. `graceful` changes nothing here: the
        agent's own SIGTERM handling is the graceful path."""
        from kubernetes.client.exceptions import ApiException

        cfg = target["config"][SCHEMA.key]
        name = handle.get("jobName")
        if not name:
            return
        namespace = handle.get("namespace") or cfg["namespace"]
        timeout = self._timeout(cfg)
        secrets: list[str] = []

        def delete(api: k8s.BatchV1Api) -> None:
            api.delete_namespaced_job(name, namespace, propagation_policy="Background", _request_timeout=timeout)

        try:
            await self._call(cfg, delete, secrets)
        except ApiException as err:
            if err.status == 404:
                return
            raise SpinUpError(redact(f"deleting Job {namespace}/{name}: {api_error(err)}", secrets)) from None

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        """Healthy when the namespace's Job API answers a one-item list for our identity."""
        from kubernetes.client.exceptions import ApiException

        cfg = target["config"][SCHEMA.key]
        namespace = cfg["namespace"]
        # A little under the fleet's own deadline for the probe, so the API's answer wins the race.
        timeout = int((target.get("healthCheck") or {}).get("timeoutMs") or DEFAULT_PROBE_TIMEOUT_MS) * 0.9 / 1000
        secrets: list[str] = []
        watch = Stopwatch()

        def list_jobs(api: k8s.BatchV1Api) -> None:
            api.list_namespaced_job(namespace, limit=1, _request_timeout=timeout)

        try:
            await self._call(cfg, list_jobs, secrets)
        except ApiException as err:
            return ProbeResult("unhealthy", watch.ms, redact(f"listing Jobs in {namespace}: {api_error(err)}", secrets))
        except SpinUpError as err:
            return ProbeResult("unhealthy", watch.ms, str(err))
        return ProbeResult("healthy", watch.ms, None)
