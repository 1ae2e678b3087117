"""How weft authenticates to NATS and secures the connection, read from the environment.

One of (or none of): user and password (`NATS_USER`/`NATS_PASS`, or in the URL,
`nats://user:pass@host`), a token (`NATS_TOKEN`), an NKey seed file (`NATS_NKEY_SEED`, a path) or a
`.creds` file (`NATS_CREDS`, a path: a user JWT and its seed, for operator/JWT setups). Plus TLS:
`NATS_TLS_CA` (the CA that signed the servers' certificates; default: the system's), and
`NATS_TLS_CERT`/`NATS_TLS_KEY` (a client certificate, for servers that `verify` clients). A
`tls://` URL asks for TLS with the system CAs when no `NATS_TLS_*` is set.

The same variables serve `weft serve`, `weft agent` and the other weft commands. Spun-up agents do
not get weft's credentials (least privilege): `agent_env()` hands them the agent's own, configured
on weft as `WEFT_AGENT_NATS_USER`/`_PASS`/`_TOKEN`/`_CREDS`/`_NKEY_SEED` (and
`WEFT_AGENT_NATS_TLS_CA`/`_CERT`/`_KEY`; the CA defaults to weft's own `NATS_TLS_CA`).

No secret's value ever appears in an exception message, a log line or a `repr`: errors name the
variable (and, for files, the path, which is not a secret).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# The variables of one credential set, by field, without their prefix (NATS_ or WEFT_AGENT_NATS_).
_VARS: dict[str, str] = {
    "user": "USER",
    "password": "PASS",
    "token": "TOKEN",
    "nkey_seed": "NKEY_SEED",
    "creds": "CREDS",
    "tls_ca": "TLS_CA",
    "tls_cert": "TLS_CERT",
    "tls_key": "TLS_KEY",
}
_FILES = ("nkey_seed", "creds", "tls_ca", "tls_cert", "tls_key")
WEFT_PREFIX = "NATS_"
AGENT_PREFIX = "WEFT_AGENT_NATS_"
# What a program run by an agent must not inherit from it (`weft agent`'s child_env).
SECRET_VARS = ("NATS_PASS", "NATS_TOKEN")


def agent_inbox_prefix(project: str) -> str:
    """Where `weft agent` gets its replies: `_INBOX_<project>.>`, one prefix per project (project ids
    have no dots), so an agent user may subscribe to its own project's replies only."""
    return f"_INBOX_{project}"


def servers_of(url: str | None) -> list[str]:
    return [u.strip() for u in (url or "").split(",") if u.strip()]


def url_has_credentials(url: str | None) -> bool:
    return any("@" in urlsplit(u if "://" in u else "nats://" + u).netloc for u in servers_of(url))


def strip_url_credentials(url: str) -> str:
    """`url` (a comma-separated list too) without any `user:pass@`: what to hand on to others."""
    out = []
    for u in servers_of(url):
        parts = urlsplit(u)
        if "@" in parts.netloc:
            u = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        out.append(u)
    return ",".join(out)


def redact_url(url: str | None) -> str:
    """`url` fit for a log line or an error message: any `user:pass@` is replaced by `***@`."""
    out = []
    for u in servers_of(url):
        parts = urlsplit(u)
        if "@" in parts.netloc:
            u = urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
        out.append(u)
    return ",".join(out)


@dataclass(frozen=True)
class NatsAuth:
    """One set of NATS credentials and TLS files (all optional), validated by `from_env`."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed: str | None = None  # path
    creds: str | None = None  # path
    tls_ca: str | None = None  # path
    tls_cert: str | None = None  # path
    tls_key: str | None = None  # path
    tls_required: bool = False  # a tls:// URL: refuse a server that does not speak TLS
    # The spun-up agents' own set (WEFT_AGENT_NATS_*), for `agent_env`; None for an agent's own.
    agent: NatsAuth | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NatsAuth:
        """weft's (or an agent's) NATS_* variables, plus the WEFT_AGENT_NATS_* ones for spun-up
        agents. ValueError, naming the variable, for a missing or unreadable file or a combination
        that makes no sense (a token with a user, two kinds of credentials, a key with no cert)."""
        url = env.get("NATS_URL") or ""
        own = cls._parse(env, WEFT_PREFIX, check_files=True, url=url)
        # Agents' files are paths where the agent runs (a pod's mounted secret, another host): weft
        # cannot check that they exist, only that the set makes sense.
        agent = cls._parse(env, AGENT_PREFIX, check_files=False, default_ca=own.tls_ca)
        own._check_ssl()
        return cls(**{f.name: getattr(own, f.name) for f in fields(cls) if f.name != "agent"}, agent=agent)

    @classmethod
    def _parse(
        cls,
        env: Mapping[str, str],
        prefix: str,
        *,
        check_files: bool,
        url: str = "",
        default_ca: str | None = None,
    ) -> NatsAuth:
        values: dict[str, str | None] = {name: (env.get(prefix + var) or None) for name, var in _VARS.items()}
        if values["tls_ca"] is None:
            values["tls_ca"] = default_ca

        def var(name: str) -> str:
            return prefix + _VARS[name]

        if values["password"] and not values["user"]:
            raise ValueError(f"{var('password')} is set but {var('user')} is not")
        if values["user"] and not values["password"]:
            raise ValueError(f"{var('user')} is set but {var('password')} is not")
        kinds = [
            name for name in ("user", "token", "nkey_seed", "creds") if values[name]
        ]
        if len(kinds) > 1:
            raise ValueError(f"{' and '.join(var(k) for k in kinds)} are both set: use one kind of NATS credentials")
        if kinds and url_has_credentials(url):
            raise ValueError(f"NATS_URL carries credentials and {var(kinds[0])} is set: use one of them")
        if values["tls_key"] and not values["tls_cert"]:
            raise ValueError(f"{var('tls_key')} is set but {var('tls_cert')} is not")
        for name in _FILES:
            path = values[name]
            if path is None:
                continue
            values[name] = path = str(Path(path).expanduser())
            if check_files and not (name == "tls_ca" and path == default_ca):
                p = Path(path)
                if not p.is_file():
                    raise ValueError(f"{var(name)}: no such file: {path}")
                try:
                    with p.open("rb"):
                        pass
                except OSError as err:
                    raise ValueError(f"{var(name)}: cannot read {path}: {err.strerror}") from None
        tls_url = any(u.startswith("tls://") for u in servers_of(url))
        return cls(**values, tls_required=tls_url)  # type: ignore[arg-type]

    # --- for connecting -------------------------------------------------------------------------

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_required)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context verifying servers against `tls_ca` (else the system CAs), with the client
        certificate if any; None when nothing TLS is configured (nats-py's defaults then)."""
        if not (self.tls_ca or self.tls_cert):
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"NATS_TLS_CA: cannot load {self.tls_ca}: {_why(err)}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert:
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(
                    f"NATS_TLS_CERT/NATS_TLS_KEY: cannot load {self.tls_cert}"
                    + (f" with {self.tls_key}" if self.tls_key else "")
                    + f": {_why(err)}"
                ) from None
        return ctx

    def _check_ssl(self) -> None:
        self.ssl_context()

    def connect_options(self) -> dict[str, Any]:
        """nats-py `connect` keyword arguments for these credentials and TLS files."""
        opts: dict[str, Any] = {}
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey_seed:
            opts["nkeys_seed"] = self.nkey_seed
        if self.token:
            opts["token"] = self.token
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password
        return opts

    # --- for spun-up agents ---------------------------------------------------------------------

    def agent_env(self) -> dict[str, str]:
        """The NATS_* variables a spun-up agent gets: the agent credentials configured on weft
        (WEFT_AGENT_NATS_*) and the TLS CA, never weft's own credentials. Every NATS_* auth variable
        is present (empty when unset), so nothing of weft's own leaks through an inherited env."""
        a = self.agent or NatsAuth()
        env = {WEFT_PREFIX + var: "" for var in _VARS.values()}
        for name, var in _VARS.items():
            value = getattr(a, name)
            if value:
                env[WEFT_PREFIX + var] = value
        return env

    def secrets(self) -> list[str]:
        """The secret values of both sets, for `weft.spinup.base.redact`."""
        out = [v for v in (self.password, self.token) if v]
        if self.agent is not None:
            out += self.agent.secrets()
        return out


def _why(err: OSError | ssl.SSLError) -> str:
    # ssl errors say which PEM step failed (no secret in them); OSError: the errno's text.
    if isinstance(err, ssl.SSLError):
        return err.reason or type(err).__name__
    return err.strerror or type(err).__name__


def redact_secrets(text: str, secrets: list[str]) -> str:
    """`text` with each secret value (longest first) replaced by `[redacted]`."""
    for value in sorted(secrets, key=len, reverse=True):
        if value:
            text = text.replace(value, "[redacted]")
    return text
