"""The kubernetes, github-actions and webhook spin-up mechanisms against local HTTP servers.

No Kubernetes API server and no GitHub can run here: `RecordingServer` (aiohttp on 127.0.0.1, a free
port) stands in for them, records every request, and answers like the real API would. Each test
checks the exact request the real API would receive. Tests synchronise on recorded requests and
events, never on sleeps, and assert no durations.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.servers import Recorded, RecordingServer
from weft.core.errors import InvalidInput
from weft.core.targets import validate_new_target
from weft.spinup import SCHEMAS
from weft.spinup.base import SpinUpError, SpinUpRequest
from weft.spinup.github import GithubActionsMechanism
from weft.spinup.kubernetes import KubernetesMechanism, job_name, label_value
from weft.spinup.webhook import WebhookMechanism

K8S_TOKEN = "k8s-tok-SECRET-7d1e"
GH_TOKEN = "ghp-SECRET-c0ffee"
HOOK_SECRET = "hook-SECRET-5a5a"
SECRETS = (K8S_TOKEN, GH_TOKEN, HOOK_SECRET)


# --- the stand-in server ---------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[RecordingServer]:
    srv = RecordingServer()
    await srv.server.start_server()
    yield srv
    await srv.server.close()


def no_secrets(*things: Any) -> None:
    text = " ".join(repr(t) for t in things)
    for secret in SECRETS:
        assert secret not in text


def make_target(mechanism: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A stored target as the fleet hands it to a mechanism (validated by weft.core.targets)."""
    body = {
        "name": "fleet-1",
        "agentType": "claude-code",
        "mechanism": mechanism,
        "capabilities": ["python", "review"],
        "boundaries": ["personal", "open-source"],
        "config": config,
        **extra,
    }
    return {**validate_new_target(body, SCHEMAS), "id": str(uuid.uuid4())}


WORK = {
    "id": "w-" + uuid.uuid4().hex[:8],
    "capability": "python",
    "boundary": 'open-source "oss"',
    "description": 'Fix the "quoted" bug in C:\\path\nthen {{targetId}} stays literal',
}


def request_for(target: dict[str, Any], work: dict[str, Any] | None = WORK) -> SpinUpRequest:
    return SpinUpRequest(str(uuid.uuid4()), "proj_a-1", target, work, "nats://nats.internal:4222")


# --- kubernetes ------------------------------------------------------------------------------------


def k8s_target(server: RecordingServer, **overrides: Any) -> dict[str, Any]:
    config = {
        "apiServer": server.url,
        "tokenRef": "env:WEFT_TEST_K8S_TOKEN",
        "namespace": "agents",
        "image": "ghcr.io/acme/weft-agent:1.2",
        "command": ["weft", "agent"],
        "args": ["--type", "claude-code", "--idle-exit", "300"],
        "env": {"LOG_LEVEL": "debug", "ANTHROPIC_API_KEY": "secret:model-keys/anthropic", "GH_PAT": "secret:gh-pat"},
        "resources": {"cpu": "500m", "memory": "1Gi"},
        "serviceAccount": "weft-agent",
        "imagePullSecret": "regcred",
        **overrides,
    }
    return make_target("kubernetes", {"kubernetes": config})


def jobs_path(namespace: str = "agents") -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs"


def created_job(rec: Recorded) -> web.Response:
    job = rec.json()
    job["metadata"]["uid"] = "3b9f-uid"
    job["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    job["metadata"]["managedFields"] = [{"manager": "weft", "operation": "Update", "fieldsType": "FieldsV1"}]
    job["status"] = {"ready": 0, "fieldFromANewerApiServer": {"x": 1}}  # clients must ignore new fields
    return web.json_response(job, status=201)


async def test_kubernetes_launch_creates_the_job_field_by_field(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the Kubernetes API server (none can run here): checks the POST a real one receives."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    server.on("POST", jobs_path(), created_job)
    target = k8s_target(server)
    req = request_for(target)

    launched = await KubernetesMechanism().launch(req)

    [post] = server.of("POST", jobs_path())
    assert post.headers["Authorization"] == f"Bearer {K8S_TOKEN}"
    assert post.headers["Content-Type"] == "application/json"
    job = post.json()
    name = job["metadata"]["name"]
    assert re.fullmatch(r"weft-agent-[0-9a-f]{8}", name) and name == f"weft-agent-{uuid.UUID(req.spin_up_id).hex[:8]}"
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["namespace"] == "agents"
    labels = {
        "app.kubernetes.io/name": "weft-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "weft",
        "weft.dev/target-id": target["id"],
        "weft.dev/spin-up-id": req.spin_up_id,
        "weft.dev/project": "proj_a-1",
        "weft.dev/agent-type": "claude-code",
    }
    assert job["metadata"]["labels"] == labels
    annotations = job["metadata"]["annotations"]
    assert annotations["weft.dev/target-name"] == "fleet-1"
    assert datetime.fromisoformat(annotations["weft.dev/created-at"].replace("Z", "+00:00")).tzinfo is not None
    assert annotations["weft.dev/spin-up-id"] == req.spin_up_id and annotations["weft.dev/work-id"] == WORK["id"]
    spec = job["spec"]
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 0
    assert spec["template"]["metadata"]["labels"] == labels
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "weft-agent"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    [container] = pod["containers"]
    assert container["name"] == "agent"
    assert container["image"] == "ghcr.io/acme/weft-agent:1.2"
    assert container["command"] == ["weft", "agent"]
    assert container["args"] == ["--type", "claude-code", "--idle-exit", "300"]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "500m", "memory": "1Gi"},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "debug"}
    assert env["ANTHROPIC_API_KEY"] == {
        "name": "ANTHROPIC_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "model-keys", "key": "anthropic"}},
    }
    assert env["GH_PAT"]["valueFrom"]["secretKeyRef"] == {"name": "gh-pat", "key": "GH_PAT"}
    plain = {n: e["value"] for n, e in env.items() if "value" in e}
    assert plain["WEFT_SPINUP_ID"] == req.spin_up_id
    assert plain["WEFT_TARGET_ID"] == target["id"]
    assert plain["WEFT_WORK_ID"] == WORK["id"]
    assert plain["NATS_URL"] == "nats://nats.internal:4222"
    assert plain["LOOMINAL_PROJECT_ID"] == "proj_a-1"
    assert plain["WEFT_AGENT_CAPABILITIES"] == "python,review"

    assert launched.handle == {"namespace": "agents", "jobName": name, "uid": "3b9f-uid"}
    no_secrets(launched.handle, job)


async def test_kubernetes_agent_nats_password_can_stay_in_a_kubernetes_secret(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for the Kubernetes API server. Found by the secrets hygiene review: weft's value of
    the agent's NATS password always overrode the target's `secret:` reference, so it was written
    into the Job spec in clear. With the reference, the spec holds only the secretKeyRef."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    server.on("POST", jobs_path(), created_job)
    target = k8s_target(server, env={"NATS_PASS": "secret:weft-agent-nats/password"})
    base = request_for(target)
    req = SpinUpRequest(base.spin_up_id, base.project, target, base.work, base.nats_url,
                        {"NATS_USER": "agents", "NATS_PASS": "nats-agent-s3cret"})
    await KubernetesMechanism().launch(req)
    [post] = server.of("POST", jobs_path())
    assert b"nats-agent-s3cret" not in post.body
    env = {e["name"]: e for e in post.json()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NATS_PASS"] == {"name": "NATS_PASS",
                                "valueFrom": {"secretKeyRef": {"name": "weft-agent-nats", "key": "password"}}}
    assert env["NATS_USER"] == {"name": "NATS_USER", "value": "agents"}


@pytest.mark.parametrize("reference", ["file", "env"])
async def test_kubernetes_kubeconfig_reference_connects_and_its_token_never_reaches_an_error(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reference: str
) -> None:
    """Stands in for the Kubernetes API server. Found by the secrets hygiene review: `kubeconfig`
    had to be a reference (it holds credentials), yet `file:PATH` was handed to the client as is and
    failed; and a kubeconfig's token was not masked in API errors the server quotes it in."""
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "weft",
        "clusters": [{"name": "c", "cluster": {"server": server.url}}],
        "users": [{"name": "u", "user": {"token": "kc-s3cret-token"}}],
        "contexts": [{"name": "weft", "context": {"cluster": "c", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig))
    monkeypatch.setenv("WEFT_TEST_KUBECONFIG", json.dumps(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    ref = f"file:{path}" if reference == "file" else "env:WEFT_TEST_KUBECONFIG"
    target = k8s_target(server, apiServer=None, tokenRef=None, kubeconfig=ref)
    server.reply("POST", jobs_path(), 403, {"kind": "Status", "code": 403, "reason": "Forbidden",
                                            "message": "token kc-s3cret-token may not create jobs"})
    with pytest.raises(SpinUpError) as err:
        await KubernetesMechanism().launch(request_for(target))
    [post] = server.of("POST", jobs_path())
    assert post.headers["Authorization"] == "Bearer kc-s3cret-token"
    assert "kc-s3cret-token" not in str(err.value) and "403" in str(err.value)


async def test_kubernetes_relaunch_of_the_same_spin_up_adopts_its_job(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the Kubernetes API server (none can run here): 409 on create, then the GET."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    req = request_for(k8s_target(server))
    name = job_name("weft-agent", req.spin_up_id)
    server.reply("POST", jobs_path(), 409, {"kind": "Status", "code": 409, "reason": "AlreadyExists",
                                            "message": f'jobs.batch "{name}" already exists'})
    existing = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": "agents", "uid": "first-uid",
                             "labels": {"weft.dev/spin-up-id": req.spin_up_id}}}
    server.reply("GET", f"{jobs_path()}/{name}", 200, existing)

    launched = await KubernetesMechanism().launch(req)

    assert launched.handle == {"namespace": "agents", "jobName": name, "uid": "first-uid"}


async def test_kubernetes_api_error_is_a_spin_up_error_with_the_api_message(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for the Kubernetes API server (none can run here): a 403 Status, as RBAC returns it."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    message = 'jobs.batch is forbidden: User "system:serviceaccount:weft:weft" cannot create resource "jobs"'
    server.reply("POST", jobs_path(), 403, {"kind": "Status", "status": "Failure", "reason": "Forbidden",
                                            "message": message, "code": 403})

    with pytest.raises(SpinUpError) as caught:
        await KubernetesMechanism().launch(request_for(k8s_target(server)))

    assert "403" in str(caught.value) and message in str(caught.value)
    no_secrets(str(caught.value))


async def test_kubernetes_missing_token_fails_before_any_request(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the Kubernetes API server (none can run here): it must never be called."""
    monkeypatch.delenv("WEFT_TEST_K8S_TOKEN", raising=False)
    with pytest.raises(SpinUpError, match="WEFT_TEST_K8S_TOKEN is not set"):
        await KubernetesMechanism().launch(request_for(k8s_target(server)))
    assert server.requests == []


async def test_kubernetes_stop_deletes_the_job_in_the_background(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the Kubernetes API server (none can run here): checks the DELETE it receives."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    target = k8s_target(server)
    path = f"{jobs_path()}/weft-agent-0a1b2c3d"
    server.reply("DELETE", path, 200, {"kind": "Status", "status": "Success"})
    handle = {"namespace": "agents", "jobName": "weft-agent-0a1b2c3d", "uid": "u"}

    await KubernetesMechanism().stop(target, handle, graceful=False)

    [delete] = server.of("DELETE", path)
    assert delete.query == {"propagationPolicy": "Background"}
    assert delete.headers["Authorization"] == f"Bearer {K8S_TOKEN}"
    # Already gone (TTL controller, a human): a 404 is success.
    server.reply("DELETE", path, 404, {"kind": "Status", "reason": "NotFound", "code": 404,
                                       "message": 'jobs.batch "weft-agent-0a1b2c3d" not found'})
    await KubernetesMechanism().stop(target, handle, graceful=True)
    assert len(server.of("DELETE", path)) == 2


async def test_kubernetes_probe_lists_one_job_in_the_namespace(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the Kubernetes API server (none can run here): checks the list request it receives."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    target = k8s_target(server)
    server.reply("GET", jobs_path(), 200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []})

    result = await KubernetesMechanism().probe(target)

    assert result.status == "healthy" and result.error is None and result.latency_ms is not None
    [listing] = server.of("GET", jobs_path())
    assert listing.query == {"limit": "1"}
    assert listing.headers["Authorization"] == f"Bearer {K8S_TOKEN}"

    server.reply("GET", jobs_path(), 401, {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized", "code": 401})
    result = await KubernetesMechanism().probe(target)
    assert result.status == "unhealthy" and "401" in (result.error or "")
    no_secrets(result)


async def test_kubernetes_probe_of_an_unreachable_api_server_is_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Kubernetes API server can run here: a closed local port stands in for an unreachable one."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    closed = RecordingServer()
    await closed.server.start_server()
    url = closed.url
    await closed.server.close()
    target = make_target("kubernetes", {"kubernetes": {"apiServer": url, "tokenRef": "env:WEFT_TEST_K8S_TOKEN",
                                                       "namespace": "agents", "image": "x"}})
    result = await KubernetesMechanism().probe(target)
    assert result.status == "unhealthy" and "unreachable" in (result.error or "")
    no_secrets(result)


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weft-test-apiserver")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "apiserver.crt", tmp_path / "apiserver.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
async def test_kubernetes_tls_is_verified_against_ca_cert_path(
    tls_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for the Kubernetes API server over TLS (none can run here): a self-signed certificate
    is accepted with caCertPath or insecureSkipTlsVerify, and rejected otherwise."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", K8S_TOKEN)
    cert_path, key_path = tls_cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    srv = RecordingServer()
    await srv.server.start_server(ssl=context)
    try:
        url = f"https://127.0.0.1:{srv.server.port}"
        srv.reply("GET", jobs_path(), 200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []})
        base = {"apiServer": url, "tokenRef": "env:WEFT_TEST_K8S_TOKEN", "namespace": "agents", "image": "x"}
        mech = KubernetesMechanism()

        trusted = await mech.probe(make_target("kubernetes", {"kubernetes": {**base, "caCertPath": str(cert_path)}}))
        assert trusted.status == "healthy", trusted.error
        skipped = await mech.probe(make_target("kubernetes", {"kubernetes": {**base, "insecureSkipTlsVerify": True}}))
        assert skipped.status == "healthy", skipped.error
        assert len(srv.of("GET", jobs_path())) == 2

        untrusted = await mech.probe(make_target("kubernetes", {"kubernetes": base}))
        assert untrusted.status == "unhealthy" and "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
        assert len(srv.of("GET", jobs_path())) == 2
        no_secrets(untrusted)
    finally:
        await srv.server.close()


def test_kubernetes_label_values_are_always_valid() -> None:
    valid = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    for value in ["p" * 64, "_leading-and-trailing_", "has space/slash", "ok-value", "-" * 70]:
        out = label_value(value)
        assert len(out) <= 63 and valid.match(out), (value, out)
    assert label_value("ok-value") == "ok-value"
    assert label_value("a" * 64) != label_value("a" * 63 + "b")


def test_kubernetes_config_validation() -> None:
    base = {"namespace": "agents", "image": "x"}
    with pytest.raises(InvalidInput, match="tokenRef"):
        make_target("kubernetes", {"kubernetes": {**base, "tokenRef": K8S_TOKEN}})
    with pytest.raises(InvalidInput, match="jobNamePrefix"):
        make_target("kubernetes", {"kubernetes": {**base, "jobNamePrefix": "Weft_Agent"}})
    with pytest.raises(InvalidInput, match="namespace"):
        make_target("kubernetes", {"kubernetes": {**base, "namespace": "Agents!"}})
    with pytest.raises(InvalidInput, match="insecureSkipTlsVerify"):
        make_target("kubernetes", {"kubernetes": {**base, "insecureSkipTlsVerify": "yes"}})


# --- github-actions --------------------------------------------------------------------------------

WF = "/repos/octo/agents/actions/workflows/agent.yml"


def gh_target(server: RecordingServer, **overrides: Any) -> dict[str, Any]:
    config = {
        "repo": "octo/agents",
        "workflow": "agent.yml",
        "ref": "release",
        "token": "env:WEFT_TEST_GH_TOKEN",
        "inputs": {"model": "sonnet", "max_turns": 30, "verbose": True},
        "apiUrl": server.url,
        "startTimeoutMs": 2000,
        **overrides,
    }
    return make_target("github-actions", {"githubActions": config})


def run(run_id: int, title: str, created: datetime) -> dict[str, Any]:
    return {
        "id": run_id,
        "name": title,
        "display_title": title,
        "event": "workflow_dispatch",
        "status": "queued",
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "html_url": f"https://github.com/octo/agents/actions/runs/{run_id}",
    }


async def test_github_dispatch_request_field_by_field_and_run_found_by_spin_up_id(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for the GitHub REST API (unreachable here): checks the dispatch and runs-list requests."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    req = request_for(gh_target(server))
    now = datetime.now(UTC)
    server.reply("POST", f"{WF}/dispatches", 204)
    # The newest run belongs to someone else's dispatch: "take the newest" would pick it.
    runs = [run(999, f"weft {uuid.uuid4()}", now + timedelta(seconds=5)), run(42, f"weft {req.spin_up_id}", now)]
    server.reply("GET", f"{WF}/runs", 200, {"total_count": 2, "workflow_runs": runs})

    before = datetime.now(UTC).replace(microsecond=0)
    launched = await GithubActionsMechanism().launch(req)
    after = datetime.now(UTC)

    [dispatch] = server.of("POST", f"{WF}/dispatches")
    assert dispatch.headers["Accept"] == "application/vnd.github+json"
    assert dispatch.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert dispatch.headers["Authorization"] == f"Bearer {GH_TOKEN}"
    assert dispatch.json() == {
        "ref": "release",
        "inputs": {
            "model": "sonnet",
            "max_turns": "30",
            "verbose": "true",
            "weft_spinup_id": req.spin_up_id,
            "weft_work_id": WORK["id"],
            "weft_nats_url": "nats://nats.internal:4222",
            "weft_project": "proj_a-1",
        },
    }
    listing = server.of("GET", f"{WF}/runs")[0]
    assert listing.query["event"] == "workflow_dispatch"
    assert listing.headers["Authorization"] == f"Bearer {GH_TOKEN}"
    assert listing.query["created"].startswith(">=")
    since = datetime.strptime(listing.query["created"][2:], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=61) <= since <= after - timedelta(seconds=59)

    assert launched.handle["runId"] == 42
    assert launched.handle["runUrl"] == "https://github.com/octo/agents/actions/runs/42"
    assert launched.handle["repo"] == "octo/agents" and launched.handle["workflow"] == "agent.yml"
    no_secrets(launched.handle)


async def test_github_run_listed_late_is_found_on_a_later_poll(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the GitHub REST API (unreachable here): the run appears on the third listing."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    req = request_for(gh_target(server, startTimeoutMs=30000), work=None)
    server.reply("POST", f"{WF}/dispatches", 204)

    def listing(_rec: Recorded) -> web.Response:
        ours = [run(7, f"weft {req.spin_up_id}", datetime.now(UTC))] if len(server.of("GET", f"{WF}/runs")) >= 3 else []
        return web.json_response({"total_count": len(ours), "workflow_runs": ours})

    server.on("GET", f"{WF}/runs", listing)
    launched = await GithubActionsMechanism().launch(req)

    assert launched.handle["runId"] == 7
    assert len(server.of("GET", f"{WF}/runs")) == 3
    assert server.of("POST", f"{WF}/dispatches")[0].json()["inputs"]["weft_work_id"] == ""


async def test_github_run_never_listed_still_launches_with_null_run_id(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for the GitHub REST API (unreachable here): only unrelated runs are ever listed."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    req = request_for(gh_target(server, startTimeoutMs=300))
    server.reply("POST", f"{WF}/dispatches", 204)
    server.reply("GET", f"{WF}/runs", 200, {"total_count": 1, "workflow_runs": [run(5, "weft other", datetime.now(UTC))]})

    launched = await GithubActionsMechanism().launch(req)

    assert launched.handle["runId"] is None and launched.handle["runUrl"] is None
    assert launched.handle["spinUpId"] == req.spin_up_id


async def test_github_422_is_a_clear_spin_up_error(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the GitHub REST API (unreachable here): GitHub's 422 for undeclared inputs."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    server.reply("POST", f"{WF}/dispatches", 422, {
        "message": 'Unexpected inputs provided: ["weft_spinup_id", "weft_nats_url"]',
        "documentation_url": "https://docs.github.com/rest/actions/workflows#create-a-workflow-dispatch-event",
        "status": "422",
    })

    with pytest.raises(SpinUpError) as caught:
        await GithubActionsMechanism().launch(request_for(gh_target(server)))

    message = str(caught.value)
    assert "422" in message and "Unexpected inputs provided" in message and "octo/agents" in message
    assert server.of("GET", f"{WF}/runs") == []
    no_secrets(message)


async def test_github_401_names_the_cause_and_missing_token_sends_nothing(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for the GitHub REST API (unreachable here): a rejected token, then no token at all."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    server.reply("POST", f"{WF}/dispatches", 401, {"message": "Bad credentials", "status": "401"})
    with pytest.raises(SpinUpError, match="401 Bad credentials") as caught:
        await GithubActionsMechanism().launch(request_for(gh_target(server)))
    no_secrets(str(caught.value))

    monkeypatch.delenv("WEFT_TEST_GH_TOKEN")
    sent = len(server.requests)
    with pytest.raises(SpinUpError, match="WEFT_TEST_GH_TOKEN is not set"):
        await GithubActionsMechanism().launch(request_for(gh_target(server)))
    assert len(server.requests) == sent


async def test_github_return_run_details_skips_the_listing(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the GitHub REST API (unreachable here): the 2026 dispatch answer with run details."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    server.reply("POST", f"{WF}/dispatches", 200, {
        "workflow_run_id": 314,
        "run_url": f"{server.url}/repos/octo/agents/actions/runs/314",
        "html_url": "https://github.com/octo/agents/actions/runs/314",
    })
    launched = await GithubActionsMechanism().launch(request_for(gh_target(server, returnRunDetails=True)))

    assert server.of("POST", f"{WF}/dispatches")[0].json()["return_run_details"] is True
    assert launched.handle["runId"] == 314 and launched.handle["runUrl"].endswith("/runs/314")
    assert server.of("GET", f"{WF}/runs") == []


async def test_github_stop_cancels_only_a_forced_stop(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the GitHub REST API (unreachable here): checks the cancel request."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    target = gh_target(server)
    cancel = "/repos/octo/agents/actions/runs/42/cancel"
    server.reply("POST", cancel, 202, {})
    handle = {"repo": "octo/agents", "workflow": "agent.yml", "runId": 42, "runUrl": None}

    await GithubActionsMechanism().stop(target, handle, graceful=True)
    assert server.requests == []

    await GithubActionsMechanism().stop(target, handle, graceful=False)
    [sent] = server.of("POST", cancel)
    assert sent.headers["Authorization"] == f"Bearer {GH_TOKEN}"
    assert sent.headers["X-GitHub-Api-Version"] == "2022-11-28"

    # A run that was not listed at launch is looked up again by spin-up id, then cancelled.
    spin_up_id = str(uuid.uuid4())
    server.reply("GET", f"{WF}/runs", 200, {"workflow_runs": [run(43, f"weft {spin_up_id}", datetime.now(UTC))]})
    server.reply("POST", "/repos/octo/agents/actions/runs/43/cancel", 409, {"message": "Cannot cancel a workflow run that is completed."})
    late = {**handle, "runId": None, "spinUpId": spin_up_id, "dispatchedAt": "2026-01-01T00:00:00.000Z"}
    await GithubActionsMechanism().stop(target, late, graceful=False)
    assert len(server.of("POST", "/repos/octo/agents/actions/runs/43/cancel")) == 1


async def test_github_probe_reads_the_workflow_state(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the GitHub REST API (unreachable here): checks the workflow read."""
    monkeypatch.setenv("WEFT_TEST_GH_TOKEN", GH_TOKEN)
    target = gh_target(server)
    server.reply("GET", WF, 200, {"id": 161335, "name": "agent", "path": ".github/workflows/agent.yml", "state": "active"})
    result = await GithubActionsMechanism().probe(target)
    assert result.status == "healthy" and result.error is None
    assert server.of("GET", WF)[0].headers["Authorization"] == f"Bearer {GH_TOKEN}"

    server.reply("GET", WF, 200, {"id": 161335, "state": "disabled_manually"})
    result = await GithubActionsMechanism().probe(target)
    assert result.status == "unhealthy" and "disabled_manually" in (result.error or "")

    server.reply("GET", WF, 404, {"message": "Not Found"})
    result = await GithubActionsMechanism().probe(target)
    assert result.status == "unhealthy" and "404" in (result.error or "")
    no_secrets(result)


def test_github_config_validation() -> None:
    base = {"repo": "octo/agents", "workflow": "agent.yml"}
    with pytest.raises(InvalidInput, match=r"inputs\.weft_spinup_id"):
        make_target("github-actions", {"githubActions": {**base, "inputs": {"weft_spinup_id": "x"}}})
    with pytest.raises(InvalidInput, match="token") as caught:
        make_target("github-actions", {"githubActions": {**base, "token": GH_TOKEN}})
    assert GH_TOKEN not in str(caught.value)
    with pytest.raises(InvalidInput, match="apiUrl"):
        make_target("github-actions", {"githubActions": {**base, "apiUrl": "ftp://x"}})


# --- webhook ---------------------------------------------------------------------------------------


def hook_target(server: RecordingServer, **overrides: Any) -> dict[str, Any]:
    config = {
        "url": f"{server.url}/spawn",
        "headers": {"Authorization": "env:WEFT_TEST_HOOK_AUTH", "X-Team": "platform"},
        **overrides,
    }
    return make_target("webhook", {"webhook": config})


async def test_webhook_json_template_is_filled_with_json_escaping(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for a webhook receiver: checks the templated body and headers it receives."""
    monkeypatch.setenv("WEFT_TEST_HOOK_AUTH", f"Bearer {HOOK_SECRET}")
    template = {
        "task": "{{description}}",
        "routing": {"boundary": "{{boundary}}", "capability": "{{capability}}"},
        "ids": ["{{spinUpId}}", "{{workId}}", "{{targetId}}"],
        "who": "{{agentType}} on {{targetName}} for {{projectId}}",
        "nats": "{{natsUrl}}",
        "count": 3,
        "unknown": "{{notAVariable}}",
    }
    target = hook_target(server, bodyTemplate=template)
    req = request_for(target)
    # The receiver echoes the headers it got: the handle must still not hold the secret.
    server.on("POST", "/spawn", lambda rec: web.json_response({"accepted": True, "echo": rec.headers}, status=202))

    launched = await WebhookMechanism().launch(req)

    [sent] = server.of("POST", "/spawn")
    assert sent.headers["Authorization"] == f"Bearer {HOOK_SECRET}"
    assert sent.headers["X-Team"] == "platform"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["X-Weft-Spinup-Id"] == req.spin_up_id
    assert sent.json() == {
        "task": WORK["description"],
        "routing": {"boundary": 'open-source "oss"', "capability": "python"},
        "ids": [req.spin_up_id, WORK["id"], target["id"]],
        "who": "claude-code on fleet-1 for proj_a-1",
        "nats": "nats://nats.internal:4222",
        "count": 3,
        "unknown": "{{notAVariable}}",
    }
    assert launched.handle["status"] == 202
    assert '"accepted": true' in launched.handle["response"]
    no_secrets(launched.handle)


async def test_webhook_string_json_template_and_default_body(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for a webhook receiver: a JSON template given as a string, then no template."""
    monkeypatch.setenv("WEFT_TEST_HOOK_AUTH", HOOK_SECRET)
    server.reply("POST", "/spawn", 200, {"ok": True})
    target = hook_target(server, bodyTemplate='{"spinup": "{{spinUpId}}", "desc": "{{description}}"}')
    req = request_for(target)
    await WebhookMechanism().launch(req)
    assert server.of("POST", "/spawn")[0].json() == {"spinup": req.spin_up_id, "desc": WORK["description"]}

    req = request_for(hook_target(server))
    await WebhookMechanism().launch(req)
    body = server.of("POST", "/spawn")[1].json()
    assert set(body) == {"spinUpId", "workId", "capability", "boundary", "description", "targetName", "targetId",
                         "agentType", "projectId", "natsUrl", "timestamp"}
    assert body["spinUpId"] == req.spin_up_id and body["boundary"] == WORK["boundary"]
    assert body["description"] == WORK["description"]


async def test_webhook_get_has_no_body_and_percent_encodes_url_placeholders(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for a webhook receiver: a GET with placeholders in the query string."""
    monkeypatch.setenv("WEFT_TEST_HOOK_AUTH", HOOK_SECRET)
    server.reply("GET", "/spawn", 200, None)
    target = hook_target(server, url=f"{server.url}/spawn?id={{{{spinUpId}}}}&boundary={{{{boundary}}}}", method="GET")
    req = request_for(target)
    await WebhookMechanism().launch(req)
    [sent] = server.of("GET", "/spawn")
    assert sent.query == {"id": req.spin_up_id, "boundary": WORK["boundary"]}
    assert sent.body == b""


async def test_webhook_non_success_status_is_a_bounded_spin_up_error(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for a webhook receiver that fails and echoes the secret header back."""
    monkeypatch.setenv("WEFT_TEST_HOOK_AUTH", HOOK_SECRET)
    server.on("POST", "/spawn", lambda rec: web.Response(status=500, text=f"boom {rec.headers['Authorization']} " + "x" * 5000))

    with pytest.raises(SpinUpError) as caught:
        await WebhookMechanism().launch(request_for(hook_target(server, successCodes=[201])))

    message = str(caught.value)
    assert "500" in message and "boom" in message and len(message) < 400
    no_secrets(message)

    server.reply("POST", "/spawn", 200, {"ok": True})  # 200 is not in successCodes [201]
    with pytest.raises(SpinUpError, match="answered 200"):
        await WebhookMechanism().launch(request_for(hook_target(server, successCodes=[201])))


async def test_webhook_timeout_is_a_spin_up_error(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for a webhook receiver that never answers (until the test releases it)."""
    monkeypatch.setenv("WEFT_TEST_HOOK_AUTH", HOOK_SECRET)
    release = asyncio.Event()

    async def hang(_rec: Recorded) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    server.on("POST", "/spawn", hang)
    try:
        with pytest.raises(SpinUpError, match="timed out after 200 ms"):
            await WebhookMechanism().launch(request_for(hook_target(server, timeoutMs=200)))
    finally:
        release.set()


async def test_webhook_probe_and_stop_url(server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for a webhook receiver: HEAD and GET health checks, and the stop call."""
    monkeypatch.setenv("WEFT_TEST_HOOK_AUTH", HOOK_SECRET)
    server.reply("HEAD", "/spawn", 204, None)
    target = hook_target(server, stopUrl=f"{server.url}/stop/{{{{spinUpId}}}}",
                         stopBodyTemplate={"spinup": "{{spinUpId}}", "graceful": "{{graceful}}", "work": "{{workId}}"})
    result = await WebhookMechanism().probe(target)
    assert result.status == "healthy" and result.error is None
    assert server.of("HEAD", "/spawn")[0].headers["Authorization"] == HOOK_SECRET

    server.reply("HEAD", "/spawn", 405, None)
    assert (await WebhookMechanism().probe(target)).status == "unhealthy"

    checked = hook_target(server, healthCheck={"url": f"{server.url}/healthz", "method": "GET"})
    server.reply("GET", "/healthz", 503, {"error": "draining"})
    result = await WebhookMechanism().probe(checked)
    assert result.status == "unhealthy" and "503" in (result.error or "")

    server.reply("POST", "/spawn", 202, {"job": "j-1"})
    req = request_for(target)
    launched = await WebhookMechanism().launch(req)
    stop_path = f"/stop/{req.spin_up_id}"
    server.reply("POST", stop_path, 200, {})
    await WebhookMechanism().stop(target, launched.handle, graceful=False)
    [stop] = server.of("POST", stop_path)
    assert stop.json() == {"spinup": req.spin_up_id, "graceful": "false", "work": WORK["id"]}
    assert stop.headers["Authorization"] == HOOK_SECRET
    no_secrets(launched.handle)


def test_webhook_config_validation() -> None:
    base = {"url": "http://127.0.0.1:9/hook"}
    with pytest.raises(InvalidInput, match="successCodes"):
        make_target("webhook", {"webhook": {**base, "successCodes": []}})
    with pytest.raises(InvalidInput, match=r"healthCheck\.method"):
        make_target("webhook", {"webhook": {**base, "healthCheck": {"method": "POST"}}})
    with pytest.raises(InvalidInput, match=r"headers\.X-Key"):
        make_target("webhook", {"webhook": {**base, "headers": {"X-Key": "secret:k8s-only"}}})
    stored = make_target("webhook", {"webhook": {**base, "healthCheck": {"method": "get"}}})
    assert stored["config"]["webhook"]["healthCheck"] == {"method": "GET"}
