"""Roles, the route table and the token file format (weft.core.access), and the safe-by-default
binding rule (Settings.exposure_problem)."""

from __future__ import annotations

import orjson
import pytest

from weft.core.access import (
    Principal,
    Role,
    ScryptParams,
    TokenEntry,
    TokenFile,
    TokenFileError,
    parse_token_file,
    required_role,
    route_roles,
)
from weft.settings import Settings

PARAMS = ScryptParams(salt=b"0123456789abcdef", n=2**10)


def test_every_mutating_route_of_the_app_has_a_role_of_its_own() -> None:
    """A new route must be placed in the table: the admin fallback is a safety net, not a policy."""
    from weft.api import agents, channels, dlq, health, openapi, stats, targets, work

    mutating = {(r.method, r.path) for m in (agents, channels, dlq, health, openapi, stats, targets, work)
                for r in m.routes() if r.method not in ("GET", "HEAD")}  # type: ignore[attr-defined]
    assert mutating == set(route_roles())


def test_reads_need_read_and_unknown_writes_need_admin() -> None:
    assert required_role("GET", "/api/anything") == Role.read
    assert required_role("POST", "/api/work") == Role.submit
    assert required_role("POST", "/api/some/new/route") == Role.admin


def test_a_file_round_trips_and_finds_its_principal() -> None:
    alice = Principal("alice", Role.operate, frozenset({"a", "b"}))
    root = Principal("root", Role.admin, None)
    tokens = TokenFile(PARAMS, (TokenEntry(alice, PARAMS.hash("t-alice")), TokenEntry(root, PARAMS.hash("t-root"))))
    parsed = parse_token_file(tokens.to_json())
    assert parsed == tokens
    assert parsed.match(PARAMS.hash("t-alice")) == alice
    assert parsed.match(PARAMS.hash("t-root")) == root
    assert parsed.match(PARAMS.hash("t-nobody")) is None


@pytest.mark.parametrize(("change", "names"), [
    ({"role": "superuser"}, "tokens[0].role"),
    ({"projects": []}, "tokens[0].projects"),
    ({"projects": ["ok", "not ok"]}, "tokens[0].projects"),
    ({"name": "has space"}, "tokens[0].name"),
    ({"hash": "abc"}, "tokens[0].hash"),
])
def test_a_malformed_entry_is_named_in_the_error(change: dict[str, object], names: str) -> None:
    good = {"name": "ci", "role": "read", "projects": "*", "hash": "00" * 32}
    doc = {"scrypt": PARAMS.to_dict(), "tokens": [{**good, **change}]}
    with pytest.raises(TokenFileError, match=names.replace("[", r"\[").replace("]", r"\]")):
        parse_token_file(orjson.dumps(doc))


def test_weak_scrypt_parameters_and_duplicate_names_are_refused() -> None:
    entry = {"name": "ci", "role": "read", "projects": "*", "hash": "00" * 32}
    with pytest.raises(TokenFileError, match="scrypt"):
        parse_token_file(orjson.dumps({"scrypt": {"salt": "00", "n": 2}, "tokens": []}))
    with pytest.raises(TokenFileError, match="appears twice"):
        parse_token_file(orjson.dumps({"scrypt": PARAMS.to_dict(), "tokens": [entry, entry]}))


def test_a_single_project_token_defaults_to_its_project() -> None:
    assert Principal("p", Role.read, frozenset({"mine"})).default_project("default") == "mine"
    assert Principal("p", Role.read, frozenset({"default", "x"})).default_project("default") == "default"
    assert Principal("p", Role.read, None).default_project("default") == "default"


@pytest.mark.parametrize(("env", "problem"), [
    ({}, False),  # no tokens: loopback by default
    ({"API_HOST": "0.0.0.0"}, True),
    ({"API_HOST": "192.0.2.7"}, True),
    ({"API_HOST": "::1"}, False),
    ({"API_HOST": "localhost"}, False),
    ({"API_HOST": "0.0.0.0", "WEFT_INSECURE": "1"}, False),
    ({"API_HOST": "0.0.0.0", "API_TOKENS": "t"}, False),
    ({"API_HOST": "0.0.0.0", "WEFT_TOKENS_FILE": "/x"}, False),
])
def test_an_open_api_binds_loopback_unless_told_otherwise(env: dict[str, str], problem: bool) -> None:
    settings = Settings.from_env(env)
    assert (settings.exposure_problem() is not None) is problem


def test_the_default_address_follows_the_tokens() -> None:
    assert Settings.from_env({}).api_host == "127.0.0.1"
    assert Settings.from_env({"API_TOKENS": "t"}).api_host == "0.0.0.0"
