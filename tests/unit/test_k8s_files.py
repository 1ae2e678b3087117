"""The Kubernetes manifests in ops/k8s/, checked statically (no cluster, no network): every document
parses and deserialises into the `kubernetes` client's typed model without losing or renaming a
field; images are pinned and match docker-compose.yml; ports, probes, env names and the drain
period agree with weft's settings, routes and README; secrets are references only; the RBAC Role
grants exactly the calls the `kubernetes` spin-up mechanism makes; the NATS config passes the real
nats-server's check and carries ops/nats/accounts.conf unchanged."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes.client
import pydantic
import pytest
import yaml
from aiohttp import web

from tests.unit.test_deployment_files import README, ROOT, SERVICES, SOURCE
from weft.api import health
from weft.api.auth import OPEN_PATHS
from weft.core.credentials import secret_named
from weft.settings import Settings
from weft.store import natsauth
from weft.store.embedded import nats_server_binary

K8S = ROOT / "ops" / "k8s"
FILES = sorted(K8S.glob("*.yaml"))
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = [p for p in FILES if p != KUSTOMIZATION]
DOCS: list[tuple[str, dict[str, Any]]] = [
    (p.name, doc) for p in MANIFESTS for doc in yaml.safe_load_all(p.read_text()) if doc is not None
]
K8S_README = (K8S / "README.md").read_text()
API = kubernetes.client.ApiClient()


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


DEPLOYMENT = one("Deployment", "weft")
POD = DEPLOYMENT["spec"]["template"]["spec"]
WEFT = next(c for c in POD["containers"] if c["name"] == "weft")
WEFT_ENV: dict[str, dict[str, Any]] = {e["name"]: e for e in WEFT.get("env", [])}
NATS_STS = one("StatefulSet", "nats")
NATS_POD = NATS_STS["spec"]["template"]["spec"]
NATS = next(c for c in NATS_POD["containers"] if c["name"] == "nats")
NATS_CONFIG = one("ConfigMap", "nats-config")["data"]


def model_class(doc: dict[str, Any]) -> type[pydantic.BaseModel]:
    """`apps/v1` + `Deployment` -> `kubernetes.client.V1Deployment`."""
    version = doc["apiVersion"].rpartition("/")[2]
    cls = getattr(kubernetes.client, version[0].upper() + version[1:] + doc["kind"], None)
    assert cls is not None, f"the kubernetes client has no model for {doc['apiVersion']} {doc['kind']}"
    return cls  # type: ignore[no-any-return]


def round_trip(doc: dict[str, Any]) -> Any:
    """The document as the typed model holds it, serialised back the way the client sends it.
    Unknown fields are refused (the models forbid extras); a snake_case alias or a coerced value
    comes back different."""
    return API.sanitize_for_serialization(model_class(doc).model_validate(doc))  # type: ignore[no-untyped-call]


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for _, d in DOCS
            if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    match = selector["matchLabels"]
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def named_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    numbers = {p["containerPort"] for p in container["ports"]}
    if isinstance(port, int):
        assert port in numbers, f"{container['name']} exposes no port {port}"
        return port
    found = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert found, f"{container['name']} has no port named {port}"
    return int(found[0])


def readme_table_vars() -> set[str]:
    """The variables of README's "Configuration (environment)" table, `A` / `B` and shorthand
    suffixes (`WEFT_AGENT_NATS_USER`, `_PASS`) expanded."""
    section = README.split("## Configuration (environment)", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        base = ""
        for token in re.findall(r"`([A-Z_][A-Z0-9_]*)`", first):
            if token.startswith("_"):
                assert base, f"README table: {token} has no variable to extend"
                names.add(base + token)
            else:
                names.add(token)
                base = token.rsplit("_", 1)[0]
    return names


# --- parsing and typed models ---------------------------------------------------------------------


def test_the_files_exist_and_parse() -> None:
    assert {p.name for p in MANIFESTS} >= {"weft.yaml", "rbac.yaml", "nats.yaml"}
    for name, doc in DOCS:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{name}: not an object"
        assert doc["metadata"].get("name"), f"{name}: a {doc['kind']} without a name"
        assert "namespace" not in doc["metadata"], f"{name}: the namespace is kustomization.yaml's to set"


def test_the_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kust["kind"] == "Kustomization"
    assert sorted(kust["resources"]) == [p.name for p in MANIFESTS]


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_every_object_deserialises_into_its_typed_model_unchanged(doc: dict[str, Any]) -> None:
    assert round_trip(doc) == doc


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"].__setitem__("replica", d["spec"].pop("replicas")),  # a misspelt field
    lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("image_pull_policy", "Always"),
    lambda d: d["spec"].__setitem__("replicas", "3"),  # a quoted number
    lambda d: d["spec"].pop("selector"),  # a required field
], ids=["typo", "snake_case", "string-for-int", "missing-required"])
def test_the_model_check_catches_a_broken_manifest(mutate: Any) -> None:
    """The check above is only worth something if it fails: mistakes a hand-written manifest makes."""
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    mutate(broken)
    try:
        assert round_trip(broken) != broken
    except pydantic.ValidationError:
        pass


# --- images ---------------------------------------------------------------------------------------


def test_every_image_is_pinned_and_matches_docker_compose() -> None:
    compose_images = {svc["image"] for svc in SERVICES.values()}
    seen = 0
    for name, pod in workloads():
        for container in pod_containers(pod):
            image = container["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
            assert image in compose_images, f"{name}: {image} is not the image docker-compose.yml runs"
            seen += 1
    assert WEFT["image"].startswith("weft:") and NATS["image"].startswith("nats:")
    assert seen >= 2


# --- weft's Deployment, Service, PDB --------------------------------------------------------------


def settings_from_manifest() -> Settings:
    """Settings as the pod would read them: secret and field references stand in as placeholders."""
    env = {name: e.get("value", f"placeholder-{name.lower()}") for name, e in WEFT_ENV.items()}
    return Settings.from_env(env)


def test_three_replicas_behind_a_pdb_and_a_service_that_select_them() -> None:
    assert DEPLOYMENT["spec"]["replicas"] == 3
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert selects(DEPLOYMENT["spec"]["selector"], labels)
    pdbs = [p for p in objects("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    assert len(pdbs) == 1 and pdbs[0]["spec"].get("minAvailable") == 2
    services = [s for s in objects("Service") if s["spec"].get("selector")
                and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]
    assert [s["metadata"]["name"] for s in services] == ["weft"]


def test_ports_agree_with_api_port() -> None:
    port = settings_from_manifest().api_port
    assert [p["containerPort"] for p in WEFT["ports"]] == [port]
    service = one("Service", "weft")
    assert [(p["port"], named_port(WEFT, p["targetPort"])) for p in service["spec"]["ports"]] == [(port, port)]


def test_the_probes_hit_weft_s_open_health_routes() -> None:
    handlers = {r.path: r.handler for r in health.routes() if isinstance(r, web.RouteDef) and r.method == "GET"}
    probes = {kind: WEFT[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe") if kind in WEFT}
    for kind, get in probes.items():
        assert get["path"] in handlers, f"{kind} probes {get['path']}, which weft does not serve"
        assert get["path"] in OPEN_PATHS, f"{kind} probes {get['path']}, which needs a token"
        assert named_port(WEFT, get["port"]) == settings_from_manifest().api_port
    assert handlers[probes["readinessProbe"]["path"]] is health.ready  # the one that says `draining`
    assert handlers[probes["livenessProbe"]["path"]] is health.live


def test_the_grace_period_covers_the_drain() -> None:
    drain = settings_from_manifest().drain_s
    assert POD["terminationGracePeriodSeconds"] >= drain + 15


def test_env_names_are_weft_s_and_in_the_readme_table() -> None:
    table = readme_table_vars()
    assert {"NATS_URL", "API_PORT", "WEFT_DRAIN_S", "WEFT_AGENT_NATS_PASS"} <= table  # the parser works
    for name in WEFT_ENV:
        assert name in table, f"the Deployment sets {name}, which README's configuration table does not list"
    # and the other way: every variable the table documents is one weft reads (by its quoted name,
    # or as one of natsauth's credential variables, which it reads as prefix + suffix)
    read = set(re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']", SOURCE))
    read |= {prefix + var for prefix in (natsauth.WEFT_PREFIX, natsauth.AGENT_PREFIX) for var in natsauth._VARS.values()}
    assert table - read == set(), "README's configuration table lists variables weft never reads"


def test_the_api_is_reachable_and_authenticated() -> None:
    settings = settings_from_manifest()
    assert settings.auth_enabled and settings.exposure_problem() is None
    assert settings.api_host == "0.0.0.0"
    assert settings.stream_replicas == NATS_STS["spec"]["replicas"]


def test_resources_and_security_context() -> None:
    for name, pod in workloads():
        pod_sc = pod.get("securityContext", {})
        for container in pod_containers(pod):
            sc = {**pod_sc, **container.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{name}: may run as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}: writable root filesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation allowed"
            res = container.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{name}: no cpu/memory requests"
            assert "memory" in res.get("limits", {}), f"{name}: no memory limit"


# --- secrets --------------------------------------------------------------------------------------


def test_secrets_are_references_never_values() -> None:
    assert not objects("Secret"), "a Secret object in the manifests would put its value in git"
    refs = set()
    for name, pod in workloads():
        for container in pod_containers(pod):
            for e in container.get("env", []):
                if secret_named(e["name"]):
                    assert "value" not in e, f"{name}: {e['name']} is a literal, not a secretKeyRef"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    assert ("weft-api-tokens", "API_TOKENS") in refs or "WEFT_TOKENS_FILE" in WEFT_ENV
    for secret, key in refs:  # ops/k8s/README.md says how to create each one
        assert secret in K8S_README and key in K8S_README, f"README.md here does not explain {secret}/{key}"


# --- NATS -----------------------------------------------------------------------------------------


def test_nats_url_names_every_node_through_the_headless_service() -> None:
    service = one("Service", NATS_STS["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(NATS_STS["spec"]["selector"], NATS_STS["spec"]["template"]["metadata"]["labels"])
    assert all(NATS_STS["spec"]["template"]["metadata"]["labels"].get(k) == v
               for k, v in service["spec"]["selector"].items())
    client = next(p for p in service["spec"]["ports"] if p["name"] == "client")
    assert named_port(NATS, client["targetPort"]) == client["port"]
    sts, svc, n = NATS_STS["metadata"]["name"], service["metadata"]["name"], NATS_STS["spec"]["replicas"]
    assert n == 3
    servers = [urlsplit(s.strip()) for s in WEFT_ENV["NATS_URL"]["value"].split(",")]
    assert sorted((s.scheme, s.hostname, s.port) for s in servers) == [
        ("nats", f"{sts}-{i}.{svc}", client["port"]) for i in range(n)]
    routes = re.findall(r"nats-route://([\w.-]+):(\d+)", NATS_CONFIG["nats.conf"])
    cluster = next(p for p in service["spec"]["ports"] if p["name"] == "cluster")
    assert sorted(routes) == [(f"{sts}-{i}.{svc}", str(cluster["port"])) for i in range(n)]


def test_the_nats_config_is_the_reference_one() -> None:
    conf = NATS_CONFIG["nats.conf"]
    assert re.search(r"^\s*sync_interval: always\s*$", conf, re.M)
    assert "include ./accounts.conf" in conf
    assert NATS_CONFIG["accounts.conf"] == (ROOT / "ops" / "nats" / "accounts.conf").read_text()
    payload = re.compile(r"^\s*max_payload:\s*(\d+)", re.M)
    assert payload.findall(conf) == payload.findall((ROOT / "ops" / "nats" / "nats1.conf").read_text())
    mount = next(m["mountPath"] for m in NATS["volumeMounts"] if m["name"] == "config")
    config_volume = next(v for v in NATS_POD["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == "nats-config"
    assert NATS["args"] == ["-c", f"{mount}/nats.conf"]
    store = re.search(r"store_dir:\s*(\S+)", conf)
    assert store and any(m["mountPath"] == store.group(1) and m["name"] in
                         {t["metadata"]["name"] for t in NATS_STS["spec"]["volumeClaimTemplates"]}
                         for m in NATS["volumeMounts"]), "JetStream's store_dir is not on the persistent volume"


def test_the_nats_config_passes_the_servers_own_check(tmp_path: Path) -> None:
    for name, text in NATS_CONFIG.items():
        (tmp_path / name).write_text(text)
    text = "\n".join(line.split("#", 1)[0] for name in ("nats.conf", "accounts.conf")
                     for line in NATS_CONFIG[name].splitlines())
    used = set(re.findall(r"\$([A-Z_][A-Z0-9_]*)", text))
    given = {e["name"] for e in NATS.get("env", [])}
    assert used == given, f"the config reads {sorted(used)}, the container sets {sorted(given)}"
    env = {name: "nats-0" if name == "POD_NAME" else "placeholder" for name in given}
    out = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr + out.stdout


# --- RBAC -----------------------------------------------------------------------------------------

VERBS = {"create": "create", "read": "get", "list": "list", "delete": "delete", "patch": "patch",
         "replace": "update", "delete_collection": "deletecollection", "watch": "watch"}
CLIENT_CALL = re.compile(r"^(delete_collection|create|read|list|delete|patch|replace|watch)_namespaced_\w+$")


def kubernetes_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every namespaced Kubernetes API call weft's code makes, each
    looked up in the client's own generated method (its REST path names group and resource)."""
    # the client's API classes weft's code names (BatchV1Api, ...): importing all of them is slow
    apis = [getattr(kubernetes.client, name) for name in sorted(set(re.findall(r"\b([A-Z]\w*V\d\w*Api)\b", SOURCE)))
            if hasattr(kubernetes.client, name)]
    calls = set()
    for path in (ROOT / "weft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and CLIENT_CALL.match(node.attr):
                owners = [cls for cls in apis if hasattr(cls, f"_{node.attr}_serialize")]
                assert len(owners) == 1, f"{path.name}: {node.attr} is no call of one API class weft names"
                source = inspect.getsource(getattr(owners[0], f"_{node.attr}_serialize"))
                rest = re.search(r"resource_path='(/apis?/[^']+)'", source)
                assert rest, node.attr
                parts = rest.group(1).strip("/").split("/")  # api/v1/... or apis/<group>/v1/...
                group = "" if parts[0] == "api" else parts[1]
                resource = parts[parts.index("{namespace}") + 1]
                calls.add((group, resource, VERBS[CLIENT_CALL.match(node.attr).group(1)]))  # type: ignore[union-attr]
    return calls


def test_the_role_grants_exactly_what_the_spinup_mechanism_calls() -> None:
    needed = kubernetes_calls()
    assert ("batch", "jobs", "create") in needed  # the derivation finds the launch
    assert not objects("ClusterRole") and not objects("ClusterRoleBinding"), "weft needs no cluster-wide access"
    (role,) = objects("Role")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs expected"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted |= {(group, resource, verb) for verb in rule["verbs"]}
    assert granted == needed


def test_the_deployment_runs_as_the_bound_service_account() -> None:
    (role,), (binding,) = objects("Role"), objects("RoleBinding")
    account = POD["serviceAccountName"]
    one("ServiceAccount", account)
    assert POD.get("automountServiceAccountToken", True) is True  # the in-cluster config reads its token
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert NATS_POD.get("automountServiceAccountToken") is False
