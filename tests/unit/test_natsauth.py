"""NatsAuth: what the environment gives, what makes no sense, and that no secret leaks."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.natscerts import make_certs
from weft.agent.settings import AgentSettings, AgentSettingsError
from weft.spinup.base import SpinUpRequest
from weft.store import connection
from weft.store.natsauth import NatsAuth, redact_url, strip_url_credentials

SECRET = "hunter2-very-secret"


def test_nothing_set_gives_no_options() -> None:
    auth = NatsAuth.from_env({})
    assert auth.connect_options() == {}
    assert not auth.uses_tls


def test_user_password_token() -> None:
    assert NatsAuth.from_env({"NATS_USER": "u", "NATS_PASS": SECRET}).connect_options() == {
        "user": "u", "password": SECRET}
    assert NatsAuth.from_env({"NATS_TOKEN": SECRET}).connect_options() == {"token": SECRET}


@pytest.mark.parametrize(("env", "names"), [
    ({"NATS_TOKEN": SECRET, "NATS_USER": "u", "NATS_PASS": SECRET}, ["NATS_USER", "NATS_TOKEN"]),
    ({"NATS_PASS": SECRET}, ["NATS_PASS", "NATS_USER"]),
    ({"NATS_USER": "u"}, ["NATS_USER", "NATS_PASS"]),
    ({"NATS_URL": f"nats://u:{SECRET}@127.0.0.1:4222", "NATS_TOKEN": SECRET}, ["NATS_URL", "NATS_TOKEN"]),
    ({"NATS_TLS_KEY": "/k"}, ["NATS_TLS_KEY", "NATS_TLS_CERT"]),
    ({"NATS_CREDS": "/nonexistent/x.creds"}, ["NATS_CREDS"]),
    ({"NATS_NKEY_SEED": "/nonexistent/x.nk"}, ["NATS_NKEY_SEED"]),
    ({"NATS_TLS_CA": "/nonexistent/ca.pem"}, ["NATS_TLS_CA"]),
    ({"WEFT_AGENT_NATS_TOKEN": SECRET, "WEFT_AGENT_NATS_CREDS": "/a.creds"},
     ["WEFT_AGENT_NATS_TOKEN", "WEFT_AGENT_NATS_CREDS"]),
])
def test_nonsense_names_the_variable_never_the_secret(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ValueError, match=names[0]) as info:
        NatsAuth.from_env(env)
    for name in names:
        assert name in str(info.value)
    assert SECRET not in str(info.value)


def test_two_kinds_of_file_credentials_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.creds").write_text("x")
    (tmp_path / "a.nk").write_text("x")
    with pytest.raises(ValueError, match="NATS_NKEY_SEED and NATS_CREDS"):
        NatsAuth.from_env({"NATS_CREDS": str(tmp_path / "a.creds"), "NATS_NKEY_SEED": str(tmp_path / "a.nk")})


def test_files_and_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    (tmp_path / "u.creds").write_text("x")
    auth = NatsAuth.from_env({"NATS_URL": "tls://127.0.0.1:4222", "NATS_TLS_CA": str(certs.ca),
                              "NATS_TLS_CERT": str(certs.client_cert), "NATS_TLS_KEY": str(certs.client_key),
                              "NATS_CREDS": str(tmp_path / "u.creds")})
    opts = auth.connect_options()
    assert isinstance(opts["tls"], ssl.SSLContext)
    assert opts["user_credentials"] == str(tmp_path / "u.creds")
    assert auth.tls_required and auth.uses_tls
    with pytest.raises(ValueError, match="NATS_TLS_CERT"):  # a key that is not the cert's
        NatsAuth.from_env({"NATS_TLS_CERT": str(certs.client_cert), "NATS_TLS_KEY": str(certs.server_key)})
    with pytest.raises(ValueError, match="NATS_TLS_CA"):
        NatsAuth.from_env({"NATS_TLS_CA": str(tmp_path / "u.creds")})  # not a PEM


def test_repr_hides_secrets() -> None:
    auth = NatsAuth.from_env({"NATS_USER": "u", "NATS_PASS": SECRET, "WEFT_AGENT_NATS_TOKEN": SECRET})
    assert SECRET not in repr(auth)


def test_agents_get_their_own_credentials_never_wefts(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    auth = NatsAuth.from_env({"NATS_USER": "weft", "NATS_PASS": SECRET, "NATS_TLS_CA": str(certs.ca),
                              "NATS_TLS_CERT": str(certs.client_cert), "NATS_TLS_KEY": str(certs.client_key),
                              "WEFT_AGENT_NATS_USER": "agent", "WEFT_AGENT_NATS_PASS": "apass"})
    env = auth.agent_env()
    assert env["NATS_USER"] == "agent" and env["NATS_PASS"] == "apass"
    assert env["NATS_TLS_CA"] == str(certs.ca)
    assert env["NATS_TLS_CERT"] == "" and env["NATS_TLS_KEY"] == ""  # weft's client cert stays weft's
    assert SECRET not in env.values()
    # Nothing configured for agents: they get empty NATS_* auth variables, not weft's.
    assert set(NatsAuth.from_env({"NATS_TOKEN": SECRET}).agent_env().values()) == {""}
    # The agent reads them back as one consistent set.
    again = NatsAuth.from_env({**env, "NATS_TLS_CA": str(certs.ca)})
    assert again.user == "agent" and again.password == "apass"


def test_spinup_request_hands_the_agent_env_on() -> None:
    target = {"id": "t1", "name": "t", "agentType": "claude-code", "capabilities": ["python"], "boundaries": ["*"]}
    nats_env = NatsAuth.from_env({"WEFT_AGENT_NATS_TOKEN": "agent-tok"}).agent_env()
    env = SpinUpRequest("s1", "p", target, None, "nats://127.0.0.1:4222", nats_env).agent_env()
    assert env["NATS_TOKEN"] == "agent-tok"
    assert "NATS_TOKEN" not in SpinUpRequest("s1", "p", target, None, "nats://127.0.0.1:4222").agent_env()


def test_urls() -> None:
    url = f"nats://u:{SECRET}@a:4222, tls://b:4222"
    assert SECRET not in redact_url(url) and "***@a:4222" in redact_url(url)
    assert strip_url_credentials(url) == "nats://a:4222,tls://b:4222"


def test_explicit_none_options_do_not_hide_auth() -> None:
    auth = NatsAuth.from_env({"NATS_USER": "u", "NATS_PASS": SECRET})
    assert connection.auth_options(auth, {"user": None, "password": None, "name": "x"}) == {
        "user": "u", "password": SECRET, "name": "x"}
    assert connection.auth_options(None, {"user": None}) == {"user": None}


def test_agent_settings_read_nats_auth_and_keep_secrets_from_commands() -> None:
    from weft.agent.main import build_parser

    args = build_parser().parse_args(["--project", "p", "--capabilities", "python", "--command", "true"])
    s = AgentSettings.from_args(args, {"NATS_TOKEN": SECRET, "PATH": "/bin"})
    assert s.nats_auth.token == SECRET
    assert "NATS_TOKEN" not in s.child_env and s.child_env["PATH"] == "/bin"
    assert SECRET not in repr(s)
    with pytest.raises(AgentSettingsError, match="NATS_TOKEN"):
        AgentSettings.from_args(args, {"NATS_TOKEN": SECRET, "NATS_USER": "u", "NATS_PASS": "p"})
