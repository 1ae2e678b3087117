"""Secrets hygiene, end to end (issue 14): every secret kind of every mechanism is used for real,
and no resolved value reaches anything weft keeps or answers.

One replica (in process, its own nats-server with users, so the agent's NATS credentials are real)
runs targets of every mechanism against real peers on 127.0.0.1: an asyncssh server, recording HTTP
servers standing in for a webhook receiver, GitHub's API and a Kubernetes API server, and a real
`weft agent` process for `local`. Each secret is a unique random value held where its reference
points (the replica's environment for `env:`, a file for `file:`). The scenario registers, reads,
tests, spins up (successes and failures: a wrong secret the peer refuses with 401/403 and echoes,
an unset variable, a missing file), health-checks, and reads everything back. Then the whole
account's streams (data and headers), every log record (root logger at DEBUG, as JSON, exception
text included), every HTTP answer (body and headers) and every WebSocket message are searched for
each value (and its base64 forms): zero hits. The peers' recordings prove the secrets were used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import nats
import pytest
from aiohttp import web

from tests.integration.test_nats_security import agent_permissions
from tests.servers import Recorded, RecordingServer, SshServer, run_sshd
from tests.support import Api, own_replica, until
from weft.logs import ContextFilter, JsonFormatter
from weft.spinup.base import SpinUpRequest
from weft.spinup.kubernetes import KubernetesMechanism, container_env
from weft.spinup.local import LocalMechanism
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port

pytestmark = pytest.mark.slow

WEFT_BIN = str(Path(sys.executable).parent / "weft")
REPO_PATH = "/repos/acme/agents/actions/workflows/agent.yml"
JOBS_PATH = "/apis/batch/v1/namespaces/agents/jobs"
SETTLE_S = 40  # bound on the whole scenario settling (it takes a few seconds)


def secret(kind: str) -> str:
    return f"s3cr3t-{kind}-{uuid.uuid4().hex}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pem_lines(pem: str) -> list[str]:
    """The distinctive lines of a PEM body (not its armour; not its first line, which for OpenSSH
    keys is the same for every key of a type)."""
    body = [line for line in pem.strip().splitlines() if line and not line.startswith("-----")]
    return [line for line in body[1:] if len(line) >= 16]


# --- the log: every record of every logger, at DEBUG, as the JSON lines LOG_FORMAT=json writes ------


class CapturedLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())  # includes `exc`: the formatted exception of a record
        self.addFilter(ContextFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def debug_log() -> Iterator[CapturedLog]:
    root = logging.getLogger()
    handler = CapturedLog()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- peers -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def recording() -> AsyncIterator[RecordingServer]:
    srv = RecordingServer()
    await srv.server.start_server()
    try:
        yield srv
    finally:
        await srv.server.close()


def refused(status: int, rec: Recorded) -> web.Response:
    """A peer that refuses and quotes what it got (headers and body), as debugging endpoints and
    policy engines do: whatever weft sent comes back in the error text it records."""
    echo = f"refused: headers {dict(rec.headers)} body {rec.body.decode(errors='replace')}"
    return web.json_response({"kind": "Status", "status": "Failure", "code": status, "message": echo}, status=status)


def guarded(accepted: set[str], header: str, ok: Any) -> Any:
    def respond(rec: Recorded) -> web.Response:
        if rec.headers.get(header) not in accepted:
            return refused(401 if rec.method != "POST" else 403, rec)
        return ok(rec)  # type: ignore[no-any-return]

    return respond


def created_job(rec: Recorded) -> web.Response:
    job = rec.json()
    job["metadata"]["uid"] = "uid-" + uuid.uuid4().hex[:8]
    return web.json_response(job, status=201)


@contextlib.asynccontextmanager
async def nats_with_users(tmp: Path, weft_pass: str, agent_pass: str, project: str) -> AsyncIterator[EmbeddedNats]:
    conf = ("authorization {\n  users = [\n"
            f'    {{ user: weft, password: "{weft_pass}" }}\n'
            f'    {{ user: agent, password: "{agent_pass}", {agent_permissions(project)} }}\n'
            "  ]\n}")
    server = EmbeddedNats(NatsServerConfig(store_dir=tmp / "nats", port=free_port(), server_name="weft-hygiene",
                                           extra=conf))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def dump_streams(url: str, weft_pass: str) -> list[tuple[str, str]]:
    """Every message of every stream of the account (the project's events, the lease and registry
    buckets), subject, headers and data, read with plain nats-py."""
    nc = await nats.connect(url, user="weft", password=weft_pass, allow_reconnect=False)
    out: list[tuple[str, str]] = []
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name, state = info.config.name, info.state
            for seq in range(max(state.first_seq, 1), state.last_seq + 1 if state.messages else 0):
                try:
                    msg = await js.get_msg(name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                data = (msg.data or b"").decode(errors="replace")
                out.append((f"stream {name} #{seq} {msg.subject}", f"{msg.subject} {msg.headers} {data}"))
    finally:
        await nc.close()
    return out


class Answers:
    """Every HTTP answer the test gets: status, headers and body, kept for the search."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.seen: list[tuple[str, str]] = []

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        resp = await self.api.call(method, path, body)
        text = await resp.text()
        self.seen.append((f"{method} {path} -> {resp.status}", f"{dict(resp.headers)} {text}"))
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, answer = await self.call(method, path, body)
        assert got == status, (method, path, answer)
        return answer


# --- the scenario --------------------------------------------------------------------------------------


class Secrets:
    """One unique value per secret kind, and where each reference points."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.monkeypatch = monkeypatch
        self.values: dict[str, str] = {}  # label -> value
        self.extra_forms: dict[str, list[str]] = {}  # label -> further forms to search (base64, PEM lines)
        self.unset = "HYG_UNSET_" + uuid.uuid4().hex[:8].upper()
        self.missing = str(tmp / "no-such-secret-file")

    def new(self, label: str) -> str:
        self.values[label] = value = secret(label)
        return value

    def env(self, label: str, value: str | None = None) -> str:
        """`env:NAME` for a fresh variable of the replica's environment holding the secret."""
        value = value if value is not None else self.new(label)
        self.values.setdefault(label, value)
        name = "HYG_" + label.upper().replace("-", "_")
        self.monkeypatch.setenv(name, value)
        return f"env:{name}"

    def file(self, label: str, value: str | None = None) -> str:
        value = value if value is not None else self.new(label)
        self.values.setdefault(label, value)
        path = self.tmp / f"{label}.secret"
        path.write_text(value + "\n")
        path.chmod(0o600)
        return f"file:{path}"

    def needles(self) -> list[tuple[str, str]]:
        out = []
        for label, value in self.values.items():
            out += [(label, value), (f"{label} (base64)", b64(value))]
            out += [(f"{label} (form)", form) for form in self.extra_forms.get(label, [])]
        return out


def target(name: str, mechanism: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "agentType": "claude-code", "mechanism": mechanism, "capabilities": [f"hyg-{name}"],
            "boundaries": ["personal"], "config": config, "maxConcurrentAgents": 1, "cooldownMs": 0,
            "spinUpTimeoutMs": 3000, "healthCheck": {"intervalMs": 600_000, "timeoutMs": 5000}, **extra}


def kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "hyg",
        "clusters": [{"name": "hyg", "cluster": {"server": server}}],
        "users": [{"name": "hyg", "user": {"token": token}}],
        "contexts": [{"name": "hyg", "context": {"cluster": "hyg", "user": "hyg", "namespace": "agents"}}],
    }))
    path.chmod(0o600)
    return path


def ssh_keys(s: Secrets, srv: SshServer) -> dict[str, str]:
    """The SSH server's authorised key three ways: encrypted PEM in the environment (passphrase in a
    file), encrypted PEM in a file (passphrase in the environment), and the plain key file read by
    path; plus a wrong passphrase."""
    key = asyncssh.read_private_key(srv.client_key_path)
    plain = srv.client_key_path.read_text()
    s.values["ssh-key-path-content"] = plain
    s.extra_forms["ssh-key-path-content"] = pem_lines(plain)
    refs: dict[str, str] = {}
    for label, key_kind, pp_kind in (("ssh-key-env", "env", "file"), ("ssh-key-file", "file", "env")):
        passphrase = s.new(f"{label}-passphrase")
        pem = key.export_private_key("pkcs8-pem", passphrase=passphrase, cipher_name="aes256-cbc",
                                     hash_name="sha256", pbe_version=2).decode()
        s.extra_forms[label] = pem_lines(pem)
        refs[label] = s.env(label, pem) if key_kind == "env" else s.file(label, pem)
        refs[f"{label}-passphrase"] = (s.env if pp_kind == "env" else s.file)(f"{label}-passphrase", passphrase)
    refs["ssh-wrong-passphrase"] = s.env("ssh-wrong-passphrase")
    return refs


ENV_DUMP = ("import json, os, sys\n"
            "with open(os.path.join(sys.argv[1], os.environ['WEFT_SPINUP_ID'] + '.json'), 'w') as f:\n"
            "    json.dump(dict(os.environ), f)\n")


async def test_no_resolved_secret_reaches_the_stream_the_logs_or_any_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = "hyg" + uuid.uuid4().hex[:10]
    s = Secrets(tmp_path, monkeypatch)
    weft_pass, agent_pass = s.new("weft-nats-pass"), s.new("agent-nats-pass")
    nats_env = {"NATS_USER": "weft", "NATS_PASS": weft_pass,
                "WEFT_AGENT_NATS_USER": "agent", "WEFT_AGENT_NATS_PASS": agent_pass}
    received = tmp_path / "received"
    received.mkdir()
    dumper = tmp_path / "dump_env.py"
    dumper.write_text(ENV_DUMP)
    local_received = received / "local.txt"

    async with contextlib.AsyncExitStack() as stack:
        log = stack.enter_context(debug_log())
        server = await stack.enter_async_context(nats_with_users(tmp_path, weft_pass, agent_pass, project))
        hook = await stack.enter_async_context(recording())
        github = await stack.enter_async_context(recording())
        k8s = await stack.enter_async_context(recording())
        sshd = await stack.enter_async_context(run_sshd(tmp_path))

        # --- secrets and the peers that accept them --------------------------------------------------
        hook_key = s.env("hook-api-key")
        basic_password = s.new("hook-basic-password")
        basic = f"Basic {b64('weft:' + basic_password)}"
        hook_basic = s.file("hook-basic-header", basic)
        hook_wrong = s.env("hook-wrong-key")
        for method, path in (("POST", "/hook"), ("HEAD", "/hook"), ("POST", "/hook/stop")):
            hook.on(method, path, guarded({s.values["hook-api-key"]}, "X-Api-Key", lambda _r: web.json_response(
                {"accepted": True}, status=202)))
        gh_env, gh_file = s.env("gh-token-env"), s.file("gh-token-file")
        gh_var_value = s.new("gh-token-var")
        monkeypatch.setenv("HYG_GH_VAR", gh_var_value)
        gh_wrong = s.env("gh-wrong-token")
        gh_ok = {f"Bearer {s.values[k]}" for k in ("gh-token-env", "gh-token-file", "gh-token-var")}
        github.on("POST", f"{REPO_PATH}/dispatches", guarded(gh_ok, "Authorization", lambda _r: web.Response(status=204)))
        github.on("GET", REPO_PATH, guarded(gh_ok, "Authorization", lambda _r: web.json_response(
            {"id": 7, "name": "agent", "path": ".github/workflows/agent.yml", "state": "active"})))
        github.on("GET", f"{REPO_PATH}/runs", guarded(gh_ok, "Authorization", lambda _r: web.json_response(
            {"total_count": 0, "workflow_runs": []})))
        k8s_env, k8s_file = s.env("k8s-token-env"), s.file("k8s-token-file")
        kc_token = s.new("kubeconfig-token")
        kc_path = kubeconfig(tmp_path / "kubeconfig", k8s.url, kc_token)
        k8s_wrong = s.env("k8s-wrong-token")
        k8s_ok = {f"Bearer {s.values[k]}" for k in ("k8s-token-env", "k8s-token-file", "kubeconfig-token")}
        k8s.on("POST", JOBS_PATH, guarded(k8s_ok, "Authorization", created_job))
        k8s.on("GET", JOBS_PATH, guarded(k8s_ok, "Authorization", lambda _r: web.json_response(
            {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": []})))
        k8s_job_env, k8s_job_file = s.env("k8s-job-env"), s.file("k8s-job-file")
        keys = ssh_keys(s, sshd)
        ssh_env, ssh_file = s.env("ssh-agent-env"), s.file("ssh-agent-file")
        local_env, local_file = s.env("local-agent-env"), s.file("local-agent-file")

        ssh_base = {"host": "127.0.0.1", "port": sshd.port, "user": "agent", "knownHosts": str(sshd.known_hosts),
                    "command": sys.executable, "args": [str(dumper), str(received)], "connectionTimeoutMs": 5000}
        hook_base = {"url": f"{hook.url}/hook", "stopUrl": f"{hook.url}/hook/stop", "timeoutMs": 5000}
        gh_base = {"repo": "acme/agents", "workflow": "agent.yml", "apiUrl": github.url, "startTimeoutMs": 0,
                   "requestTimeoutMs": 5000}
        k8s_base = {"apiServer": k8s.url, "namespace": "agents", "image": "ghcr.io/acme/weft-agent:1",
                    "requestTimeoutMs": 5000}
        agent_cmd = (f'printf "%s\\n%s\\n" "$LOCAL_SECRET_ENV" "$LOCAL_SECRET_FILE" > {local_received}; '
                     "echo done")
        local_secret_env = {"LOCAL_SECRET_ENV": local_env, "LOCAL_SECRET_FILE": local_file}
        targets = [
            # local: env refs into the agent's environment; a real `weft agent` that registers as the
            # restricted NATS user (its credentials come from WEFT_AGENT_NATS_*) and runs the work.
            target("local-agent", "local", {"local": {
                "command": WEFT_BIN, "args": ["agent", "--idle-exit", "1", "--command", agent_cmd],
                "env": {**local_secret_env, "LOG_LEVEL": "debug", "LOG_FORMAT": "json"}, "logDir": str(tmp_path / "logs")}},
                spinUpTimeoutMs=60_000),
            # local: an agent that crashes at once, printing its secrets: the log tail goes into an event.
            target("local-crash", "local", {"local": {
                "command": "/bin/sh", "args": ["-c", 'echo "crash $LOCAL_SECRET_ENV $LOCAL_SECRET_FILE $NATS_PASS"; exit 3'],
                "env": local_secret_env, "logDir": str(tmp_path / "crash-logs")}}),
            target("local-unset", "local", {"local": {"command": "/bin/sh", "env": {"K": f"env:{s.unset}"}}}),
            target("local-missing", "local", {"local": {"command": "/bin/sh", "env": {"K": f"file:{s.missing}"}}}),
            # ssh: private key from env (passphrase from a file) with env refs for the agent, from a file
            # (passphrase from env), by path; a wrong passphrase; a key file that is not there.
            target("ssh-env-key", "ssh", {"ssh": {**ssh_base, "privateKey": keys["ssh-key-env"],
                                                  "passphrase": keys["ssh-key-env-passphrase"],
                                                  "env": {"SSH_SECRET_ENV": ssh_env, "SSH_SECRET_FILE": ssh_file}}}),
            target("ssh-file-key", "ssh", {"ssh": {**ssh_base, "privateKey": keys["ssh-key-file"],
                                                   "passphrase": keys["ssh-key-file-passphrase"]}}),
            target("ssh-key-path", "ssh", {"ssh": {**ssh_base, "privateKeyPath": str(sshd.client_key_path)}}),
            target("ssh-wrong", "ssh", {"ssh": {**ssh_base, "privateKey": keys["ssh-key-env"],
                                                "passphrase": keys["ssh-wrong-passphrase"]}}),
            target("ssh-missing", "ssh", {"ssh": {**ssh_base, "privateKey": f"file:{s.missing}"}}),
            # webhook: an API key header from env, a basic-auth header from a file; wrong, unset, missing.
            target("hook", "webhook", {"webhook": {**hook_base, "headers": {"X-Api-Key": hook_key,
                                                                           "Authorization": hook_basic}}}),
            target("hook-wrong", "webhook", {"webhook": {**hook_base, "headers": {"X-Api-Key": hook_wrong,
                                                                                 "Authorization": hook_basic}}}),
            target("hook-unset", "webhook", {"webhook": {**hook_base, "headers": {"X-Api-Key": f"env:{s.unset}"}}}),
            target("hook-missing", "webhook", {"webhook": {**hook_base, "headers": {"Authorization": f"file:{s.missing}"}}}),
            # github-actions: token from env, from a file, from tokenEnvVar; wrong, unset.
            target("gh-env", "github-actions", {"githubActions": {**gh_base, "token": gh_env}}),
            target("gh-file", "github-actions", {"githubActions": {**gh_base, "token": gh_file}}),
            target("gh-var", "github-actions", {"githubActions": {**gh_base, "tokenEnvVar": "HYG_GH_VAR"}}),
            target("gh-wrong", "github-actions", {"githubActions": {**gh_base, "token": gh_wrong}}),
            target("gh-unset", "github-actions", {"githubActions": {**gh_base, "token": f"env:{s.unset}"}}),
            # kubernetes: bearer token from env (the Job's env: secret:, env: and file: values, and the
            # agent's NATS password from a Kubernetes Secret), from a file, from a kubeconfig file;
            # a wrong token (the API server quotes the Job back), a missing token file.
            target("k8s-env", "kubernetes", {"kubernetes": {**k8s_base, "tokenRef": k8s_env, "env": {
                "MODEL_KEY": "secret:model-keys/anthropic", "JOB_SECRET_ENV": k8s_job_env,
                "JOB_SECRET_FILE": k8s_job_file, "NATS_PASS": "secret:weft-agent-nats/password"}}}),
            target("k8s-file", "kubernetes", {"kubernetes": {**k8s_base, "tokenRef": k8s_file}}),
            target("k8s-kubeconfig", "kubernetes", {"kubernetes": {
                "namespace": "agents", "image": "ghcr.io/acme/weft-agent:1", "kubeconfig": f"file:{kc_path}"}}),
            target("k8s-wrong", "kubernetes", {"kubernetes": {**k8s_base, "tokenRef": k8s_wrong,
                                                              "env": {"JOB_SECRET_ENV": k8s_job_env}}}),
            target("k8s-missing", "kubernetes", {"kubernetes": {**k8s_base, "tokenRef": f"file:{s.missing}"}}),
        ]
        failing = {"local-unset", "local-missing", "ssh-wrong", "ssh-missing", "hook-wrong", "hook-unset",
                   "hook-missing", "gh-wrong", "gh-unset", "k8s-wrong", "k8s-missing"}
        names_reference = {"local-unset": s.unset, "local-missing": s.missing, "ssh-missing": s.missing,
                           "ssh-wrong": keys["ssh-key-env"], "hook-unset": s.unset, "hook-missing": s.missing,
                           "gh-unset": s.unset, "k8s-missing": s.missing}

        api = await stack.enter_async_context(own_replica(
            server.url, project, nats_env=nats_env, nats_user="weft", nats_pass=weft_pass, heartbeat_ms=500,
            accept_timeout_ms=10_000, idle_timeout_ms=600_000))
        local = api.service.mechanisms["local"] if api.service is not None else None
        stack.push_async_callback(kill_local_agents, local)
        answers = Answers(api)
        ws_messages: list[str] = []
        ws = await stack.enter_async_context(api.client.ws_connect("/api/ws"))
        await ws.send_json({"type": "subscribe", "topic": "targets", "projectId": project})
        assert json.loads((await ws.receive()).data)["type"] == "ack"
        ws_seen = asyncio.Event()
        max_ws_seq = [0]

        async def read_ws() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                ws_messages.append(msg.data)
                max_ws_seq[0] = max(max_ws_seq[0], json.loads(msg.data).get("seq") or 0)
                ws_seen.set()

        reader = asyncio.create_task(read_ws())
        stack.callback(reader.cancel)

        # --- register, read back, test, spin up ---------------------------------------------------------
        ids = {}
        for body in targets:
            ids[body["name"]] = (await answers.ok("POST", "/api/targets", body, status=201))["id"]
        await answers.ok("GET", "/api/targets")
        await answers.ok("GET", "/api/targets?limit=5")
        for name, tid in ids.items():
            await answers.ok("GET", f"/api/targets/{tid}")
            await answers.ok("GET", f"/api/targets/{name}")
        results = {name: await answers.ok("POST", f"/api/targets/{tid}/test") for name, tid in ids.items()}
        for name, result in results.items():
            assert result["healthy"] is (name not in failing), (name, result)
            if name in names_reference:
                assert names_reference[name] in result["error"], (name, result["error"])
        assert "401" in results["hook-wrong"]["error"] and "401" in results["gh-wrong"]["error"]
        assert "401" in results["k8s-wrong"]["error"]

        work = await answers.ok("POST", "/api/work", {"capability": "hyg-local-agent", "boundary": "personal",
                                                      "description": "hygiene"}, status=201)
        for name, tid in ids.items():
            if name != "local-agent":
                await answers.ok("POST", f"/api/targets/{tid}/spin-up", {})

        def unsettled(state: Any) -> list[str]:
            """What the scenario still waits for (empty once it has settled)."""
            item = state.work.get(work["id"])
            waits = [] if item is not None and item.get("status") == "completed" else [f"work item {item}"]
            for name, tid in ids.items():
                t = state.targets[tid]
                if t["activeSpinUps"] or t["lastSpinUp"] is None:
                    waits.append(f"target {name}: active {t['activeSpinUps']} last {t['lastSpinUp']}")
            return waits + [f"agent {a['guid']} {a['status']}" for a in state.agents.values()
                            if a["status"] != "offline"]

        try:
            await until(api, lambda st: not unsettled(st), timeout=SETTLE_S)
        except AssertionError:
            raise AssertionError("never settled: " + "; ".join(
                unsettled(api.service.readmodel.views[project].state))) from None  # type: ignore[union-attr]
        state = api.service.readmodel.views[project].state  # type: ignore[union-attr]
        outcome = {name: state.targets[tid]["lastSpinUp"] for name, tid in ids.items()}
        assert outcome["local-agent"]["outcome"] == "success", outcome["local-agent"]
        assert all(o["outcome"] == "failed" for n, o in outcome.items() if n != "local-agent"), outcome
        for name, ref in names_reference.items():
            assert ref in outcome[name]["error"], (name, outcome[name]["error"])
        assert "exited with status 3" in outcome["local-crash"]["error"]
        assert "crash <env:HYG_LOCAL_AGENT_ENV>" in outcome["local-crash"]["error"]
        assert "403" in outcome["k8s-wrong"]["error"] and "refused" in outcome["k8s-wrong"]["error"]
        assert "403" in outcome["hook-wrong"]["error"] and "refused" in outcome["hook-wrong"]["error"]
        assert "401" in outcome["gh-wrong"]["error"] or "403" in outcome["gh-wrong"]["error"]
        # The overdue spin-ups were stopped: the webhook's stop URL was called, with its headers.
        await recorded(hook, lambda r: r.path == "/hook/stop" and r.headers.get("X-Api-Key") == s.values["hook-api-key"])

        # --- read everything back ---------------------------------------------------------------------
        await answers.ok("GET", f"/api/work/{work['id']}")
        await answers.ok("GET", f"/api/work/{work['id']}/history")
        agents = await answers.ok("GET", "/api/agents")
        for agent in agents["agents"]:
            await answers.ok("GET", f"/api/agents/{agent['guid']}")
            await answers.ok("GET", f"/api/agents/{agent['guid']}/history")
        for path in ("/api/targets", "/api/stats", "/api/stats/projects", "/api/stats/projection", "/api/work",
                     "/api/dlq", "/health", "/health/ready", "/metrics"):
            await answers.ok("GET", path)
        for tid in ids.values():
            await answers.ok("GET", f"/api/targets/{tid}")
        streams = await dump_streams(server.url, weft_pass)
        finished = [int(where.split("#")[1].split()[0]) for where, text in streams
                    if where.startswith(f"stream WEFT_{project} ") and '"spinup.failed"' in text]
        async with asyncio.timeout(30):  # the `targets` topic delivered every spin-up's end
            while max_ws_seq[0] < max(finished):
                ws_seen.clear()
                await ws_seen.wait()
        agent_log = [(f"agent log {p.name}", p.read_text()) for p in (tmp_path / "logs").glob("*.log")]

    # --- the peers got the secrets (the scenario really used them) ----------------------------------------
    assert local_received.read_text().split() == [s.values["local-agent-env"], s.values["local-agent-file"]]
    ssh_dumps = [json.loads(p.read_text()) for p in received.glob("*.json")]
    assert len(ssh_dumps) == 3, "each ssh target with a good key launched its command"
    with_env = [d for d in ssh_dumps if "SSH_SECRET_ENV" in d]
    assert [(d["SSH_SECRET_ENV"], d["SSH_SECRET_FILE"]) for d in with_env] == [
        (s.values["ssh-agent-env"], s.values["ssh-agent-file"])]
    assert all(d["NATS_USER"] == "agent" and d["NATS_PASS"] == agent_pass for d in ssh_dumps)
    sent = [(r.method, r.headers.get("X-Api-Key"), r.headers.get("Authorization")) for r in hook.requests]
    assert ("POST", s.values["hook-api-key"], basic) in sent and ("HEAD", s.values["hook-api-key"], basic) in sent
    assert ("POST", s.values["hook-wrong-key"], basic) in sent
    auth = {r.headers.get("Authorization") for r in github.of("POST", f"{REPO_PATH}/dispatches")}
    assert gh_ok <= auth and f"Bearer {s.values['gh-wrong-token']}" in auth
    posts = k8s.of("POST", JOBS_PATH)
    assert k8s_ok <= {r.headers.get("Authorization") for r in posts}
    [job] = [r.json() for r in posts if r.headers.get("Authorization") == f"Bearer {s.values['k8s-token-env']}"]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    # Where resolved secrets do go: env:/file: values of the target's env into the Job spec (plain);
    # secret: references stay references, the agent's NATS password included.
    assert env["JOB_SECRET_ENV"]["value"] == s.values["k8s-job-env"]
    assert env["JOB_SECRET_FILE"]["value"] == s.values["k8s-job-file"]
    assert env["MODEL_KEY"] == {"name": "MODEL_KEY", "valueFrom": {"secretKeyRef": {"name": "model-keys", "key": "anthropic"}}}
    assert env["NATS_PASS"] == {"name": "NATS_PASS", "valueFrom": {"secretKeyRef": {"name": "weft-agent-nats", "key": "password"}}}
    assert agent_pass not in json.dumps(job)

    # --- and nothing weft keeps or answers holds any of them ----------------------------------------------
    assert streams and any(".ev.target." in where for where, _ in streams)
    assert any("spinup.failed" in text for _, text in streams) and any("agent.registered" in text for _, text in streams)
    assert log.lines and ws_messages and answers.seen
    haystack = [*streams, *[(f"log line {i}", line) for i, line in enumerate(log.lines)],
                *answers.seen, *[(f"websocket message {i}", m) for i, m in enumerate(ws_messages)]]
    hits = [(label, where) for label, needle in s.needles() for where, text in haystack if needle in text]
    assert hits == [], f"secret values found: {hits[:20]}"
    # The reference agent's own log (it runs with LOG_LEVEL=debug) holds none either.
    agent_hits = [(label, where) for label, needle in s.needles() for where, text in agent_log if needle in text]
    assert agent_hits == [], agent_hits


async def recorded(server: RecordingServer, wanted: Any, timeout: float = 30) -> Recorded:
    """The first request `wanted` accepts, awaited (woken by each arriving request)."""
    async with asyncio.timeout(timeout):
        while True:
            found = [r for r in server.requests if wanted(r)]
            if found:
                return found[0]
            server.arrived.clear()
            await server.arrived.wait()


async def kill_local_agents(local: LocalMechanism | None) -> None:
    for pid in local.children() if local is not None else []:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        await local.wait(pid)


# --- the fixes, each on its own ---------------------------------------------------------------------------

AGENT_PASS = "s3cr3t-agent-nats-" + uuid.uuid4().hex


def spin_request(target: dict[str, Any]) -> SpinUpRequest:
    return SpinUpRequest(str(uuid.uuid4()), "hyg", target, None, "nats://127.0.0.1:4222",
                         {"NATS_USER": "agent", "NATS_PASS": AGENT_PASS, "NATS_TOKEN": ""})


def stored(mechanism: str, config: dict[str, Any]) -> dict[str, Any]:
    from weft.core.targets import validate_new_target
    from weft.spinup import SCHEMAS

    body = {"name": "t", "agentType": "claude-code", "mechanism": mechanism, "capabilities": ["python"],
            "config": config}
    return {**validate_new_target(body, SCHEMAS), "id": str(uuid.uuid4())}


async def test_a_crashing_local_agents_log_tail_masks_its_nats_credentials(tmp_path: Path) -> None:
    target = stored("local", {"local": {"command": "/bin/sh", "args": ["-c", 'echo "pass=$NATS_PASS"; exit 3'],
                                        "logDir": str(tmp_path)}})
    with pytest.raises(Exception) as caught:
        await LocalMechanism().launch(spin_request(target))
    assert "pass=<NATS_PASS>" in str(caught.value) and AGENT_PASS not in str(caught.value)


def test_a_kubernetes_secret_reference_supplies_the_agents_nats_password() -> None:
    agent = spin_request(stored("kubernetes", {"kubernetes": {"image": "i"}})).agent_env()
    env = {e["name"]: e for e in container_env({"NATS_PASS": "secret:weft-agent-nats/password"}, agent, [])}
    assert env["NATS_PASS"] == {"name": "NATS_PASS",
                                "valueFrom": {"secretKeyRef": {"name": "weft-agent-nats", "key": "password"}}}
    assert env["NATS_USER"] == {"name": "NATS_USER", "value": "agent"}
    # Without one, the agent env still wins (WEFT_* and NATS_URL always do).
    plain = {e["name"]: e for e in container_env({"WEFT_SPINUP_ID": "secret:x/y"}, agent, [])}
    assert plain["WEFT_SPINUP_ID"]["value"] == agent["WEFT_SPINUP_ID"] and plain["NATS_PASS"]["value"] == AGENT_PASS


async def test_kubernetes_errors_mask_the_agents_nats_password_and_a_kubeconfig_token(tmp_path: Path) -> None:
    token = "s3cr3t-kc-" + uuid.uuid4().hex
    async with recording() as k8s:
        k8s.on("POST", "/apis/batch/v1/namespaces/agents/jobs", lambda rec: refused(403, rec))
        path = kubeconfig(tmp_path / "kc", k8s.url, token)
        target = stored("kubernetes", {"kubernetes": {"image": "i", "namespace": "agents", "kubeconfig": f"file:{path}"}})
        with pytest.raises(Exception) as caught:
            await KubernetesMechanism().launch(spin_request(target))
        [post] = k8s.requests
    assert post.headers["Authorization"] == f"Bearer {token}"  # the kubeconfig file was used
    message = str(caught.value)
    assert "403" in message and "refused" in message
    assert AGENT_PASS not in message and token not in message
