"""Who may do what: roles, the scope each route needs, and the token file's format.

Pure: the API's auth middleware reads the file and asks these functions. A principal is what a
valid token stands for; its `name` becomes the `actor` of every event it causes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeGuard

import orjson

from projections.events import is_valid_project_id


class Role(IntEnum):
    """Ordered: each role may do everything the ones below it may."""

    read = 1
    submit = 2
    operate = 3  # cancel, retry, agent reports over REST, targets, spin-up, shutdown
    admin = 4  # besides operate: irreversible removal (DLQ discard)


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    projects: frozenset[str] | None  # None: every project
    rate_per_s: float | None = None  # requests/s on each replica (None: WEFT_RATE_LIMIT_PER_S)

    def may_use(self, project: str) -> bool:
        return self.projects is None or project in self.projects

    def may(self, role: Role) -> bool:
        return self.role >= role

    def default_project(self, configured: str) -> str:
        """The project a request that names none acts on: the configured default if this principal
        may use it, else its first listed project (a token for one project needs no projectId)."""
        if self.projects is None or configured in self.projects or not self.projects:
            return configured
        return min(self.projects)


FULL_ACCESS = Role.admin
ANONYMOUS = Principal(name="api", role=Role.admin, projects=None)

# (method, route template) -> the role it needs; any other non-GET route needs admin (fail closed).
_ROUTE_ROLES: dict[tuple[str, str], Role] = {
    ("POST", "/api/work"): Role.submit,
    ("POST", "/api/work/cancel-batch"): Role.operate,
    ("POST", "/api/work/{id}/cancel"): Role.operate,
    ("POST", "/api/work/{id}/accept"): Role.operate,
    ("POST", "/api/work/{id}/progress"): Role.operate,
    ("POST", "/api/work/{id}/complete"): Role.operate,
    ("POST", "/api/work/{id}/fail"): Role.operate,
    ("POST", "/api/agents/shutdown-batch"): Role.operate,
    ("POST", "/api/agents/{guid}/shutdown"): Role.operate,
    ("POST", "/api/targets"): Role.operate,
    ("POST", "/api/targets/disable-batch"): Role.operate,
    ("PUT", "/api/targets/{idOrName}"): Role.operate,
    ("DELETE", "/api/targets/{idOrName}"): Role.operate,
    ("POST", "/api/targets/{idOrName}/test"): Role.operate,
    ("POST", "/api/targets/{idOrName}/spin-up"): Role.operate,
    ("POST", "/api/targets/{idOrName}/enable"): Role.operate,
    ("POST", "/api/targets/{idOrName}/disable"): Role.operate,
    ("POST", "/api/dlq/{id}/retry"): Role.operate,
    ("POST", "/api/dlq/{id}/discard"): Role.admin,
}


def required_role(method: str, route: str) -> Role:
    if method in ("GET", "HEAD", "OPTIONS"):
        return Role.read
    return _ROUTE_ROLES.get((method, route), Role.admin)


def route_roles() -> dict[tuple[str, str], Role]:
    """The table above, for the README and the test that every mutating route is listed."""
    return dict(_ROUTE_ROLES)


# --- the token file -------------------------------------------------------------------------------

class TokenFileError(ValueError):
    """The token file is malformed; the message names the entry and field."""


@dataclass(frozen=True)
class ScryptParams:
    """One salt per file: a presented token costs one scrypt, then a lookup among the entries."""

    salt: bytes
    n: int = 2**14
    r: int = 8
    p: int = 1

    def hash(self, token: str) -> bytes:
        return hashlib.scrypt(token.encode(), salt=self.salt, n=self.n, r=self.r, p=self.p,
                              maxmem=256 * self.n * self.r + (1 << 20), dklen=32)

    def to_dict(self) -> dict[str, Any]:
        return {"salt": self.salt.hex(), "n": self.n, "r": self.r, "p": self.p}


@dataclass(frozen=True)
class TokenEntry:
    principal: Principal
    digest: bytes  # ScryptParams.hash of the token


@dataclass(frozen=True)
class TokenFile:
    params: ScryptParams
    entries: tuple[TokenEntry, ...]

    def match(self, digest: bytes) -> Principal | None:
        """The entry whose digest equals `digest`, compared in constant time against every entry."""
        found: Principal | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        return found

    def to_json(self) -> bytes:
        tokens = [{"name": e.principal.name, "role": e.principal.role.name,
                   "projects": "*" if e.principal.projects is None else sorted(e.principal.projects),
                   **({} if e.principal.rate_per_s is None else {"ratePerSecond": e.principal.rate_per_s}),
                   "hash": e.digest.hex()} for e in self.entries]
        return orjson.dumps({"scrypt": self.params.to_dict(), "tokens": tokens}, option=orjson.OPT_INDENT_2)


def _name_ok(name: Any) -> TypeGuard[str]:
    return isinstance(name, str) and is_valid_project_id(name)


def parse_token_file(text: str | bytes) -> TokenFile:
    """`{"scrypt": {"salt": hex, "n", "r", "p"}, "tokens": [{"name", "role", "projects", "hash"}]}`
    (README: Security). Every error names the entry and the field."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise TokenFileError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("scrypt"), dict) or not isinstance(doc.get("tokens"), list):
        raise TokenFileError('expected {"scrypt": {...}, "tokens": [...]}')
    kdf = doc["scrypt"]
    try:
        params = ScryptParams(salt=bytes.fromhex(kdf["salt"]), n=int(kdf.get("n", 2**14)), r=int(kdf.get("r", 8)),
                              p=int(kdf.get("p", 1)))
    except (KeyError, TypeError, ValueError):
        raise TokenFileError("scrypt: salt must be hex; n, r, p integers") from None
    if len(params.salt) < 16 or params.n < 2**10 or params.n & (params.n - 1) or not 1 <= params.r <= 64 \
            or not 1 <= params.p <= 16:
        raise TokenFileError("scrypt: salt ≥ 16 bytes, n a power of two ≥ 1024, 1 ≤ r ≤ 64, 1 ≤ p ≤ 16")
    entries: list[TokenEntry] = []
    names: set[str] = set()
    for i, raw in enumerate(doc["tokens"]):
        where = f"tokens[{i}]"
        if not isinstance(raw, dict):
            raise TokenFileError(f"{where}: must be an object")
        name = raw.get("name")
        if not _name_ok(name):
            raise TokenFileError(f"{where}.name: must match [A-Za-z0-9_-]{{1,64}}")
        if name in names:
            raise TokenFileError(f"{where}.name: {name!r} appears twice")
        names.add(name)
        try:
            role = Role[raw.get("role", "")]
        except KeyError:
            raise TokenFileError(f"{where}.role: one of {', '.join(r.name for r in Role)}") from None
        projects_raw = raw.get("projects")
        projects: frozenset[str] | None
        if projects_raw == "*":
            projects = None
        elif isinstance(projects_raw, list) and projects_raw and all(_name_ok(p) for p in projects_raw):
            projects = frozenset(projects_raw)
        else:
            raise TokenFileError(f'{where}.projects: "*" or a non-empty list of project ids')
        try:
            digest = bytes.fromhex(raw.get("hash", ""))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokenFileError(f"{where}.hash: 64 hex digits (weft tokens add writes it)")
        rate = raw.get("ratePerSecond")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0):
            raise TokenFileError(f"{where}.ratePerSecond: a number >= 0 (0: no limit)")
        entries.append(TokenEntry(Principal(name=name, role=role, projects=projects,
                                            rate_per_s=None if rate is None else float(rate)), digest))
    return TokenFile(params, tuple(entries))


# API_TOKENS entries have no names: a slow hash of the token stands for it, so an actor id in an
# event cannot be turned back into a guessable token at the speed of sha256.
_LEGACY_ACTOR_PARAMS = ScryptParams(salt=b"weft legacy API_TOKENS actor id")


def legacy_actor(token: str) -> str:
    return "token:" + _LEGACY_ACTOR_PARAMS.hash(token).hex()[:16]
