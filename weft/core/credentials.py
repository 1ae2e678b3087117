"""Literal credentials in a target definition: found by where they sit and by what they look like.

A field whose name says it holds a secret must hold a reference (`env:NAME`, `file:PATH`, or
`secret:NAME[/KEY]` for a Kubernetes secret), whatever the value's type. Every other string, at
any depth, is checked for the shapes credentials take anyway: key material, credentials in a URL,
a token-named query parameter, an assignment or flag in a command, a bearer header, inline
kubeconfig, and the fixed prefixes of common providers' tokens. Name lists always miss one, which
is why the second check looks at values. Messages name the field, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

REFERENCE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/?\S+|secret:[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[A-Za-z0-9_.-]+)?)$")
# Fields whose value names where a secret is (a path, a variable's name), not the secret itself.
REFERENCE_FIELDS = frozenset({"privateKeyPath", "tokenEnvVar", "imagePullSecret", "serviceAccount", "knownHosts"})
SECRET_WORDS = frozenset({
    "secret", "secrets", "token", "tokens", "password", "passwd", "pass", "pwd", "pw", "passphrase", "auth",
    "authorization", "credential", "credentials", "cookie", "cookies", "session", "signature", "sig", "pat",
    "apikey", "key", "kubeconfig", "bearer", "dsn", "jwt",
})
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

TOKEN_SHAPES = re.compile(
    r"-----BEGIN [A-Z0-9 ]+-----"  # PEM key material
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{20,}|\bglpat-[A-Za-z0-9_-]{20,}"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}|\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\bAIza[0-9A-Za-z_-]{35}|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|\b(?:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|client-(?:key|certificate)-data\s*:|^\s*apiVersion:.*\bclusters:",
    re.I | re.S | re.M,
)
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")
# NAME=value or --flag value in a command, where the name says secret and the value is not a
# shell expansion of the environment ($NAME, ${NAME}): the secret would be in the command itself.
_SECRET_NAME = r"[A-Za-z0-9_]*(?:token|secret|passw(?:or)?d|pwd|api_?key|access_?key|_pat|_key|credential)[A-Za-z0-9_]*"
ASSIGNMENT = re.compile(rf"(?:^|[\s;&|(`'\"])({_SECRET_NAME})=(?![\s$'\"]|$)", re.I)
FLAG = re.compile(r"(?:^|\s)--?(?:token|password|passwd|pass|secret|api-?key|access-?key|auth-token|pat)(?:=|\s+)"
                  r"(?![\s$\-'\"]|$)", re.I)


def secret_named(key: str) -> bool:
    """Whether a field's name says it holds a secret: `X-Api-Key`, `GH_PAT`, `dbPassword`, `token`."""
    if key in REFERENCE_FIELDS:
        return False
    words = [w.lower() for w in _WORDS.findall(key)]
    if words and words[-1] in ("path", "file", "dir"):  # where a secret is, not what it is
        return False
    return any(w in SECRET_WORDS for w in words) or "apikey" in key.lower().replace("-", "").replace("_", "")


def value_problem(text: str) -> str | None:
    """What credential this string looks like it carries, or None."""
    if TOKEN_SHAPES.search(text):
        return "looks like a credential (key material, a provider token, a bearer header or an inline kubeconfig)"
    for url in URL.findall(text):
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        if "@" in parts.netloc:
            return "is a URL with credentials in it (user:password@)"
        if any(secret_named(k) for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
            return "is a URL with a credential in its query string"
    if ASSIGNMENT.search(text) or FLAG.search(text):
        return "passes a secret literally (NAME=value or --token value): use $NAME from the agent's environment"
    return None


def _unset_or_reference(value: Any) -> bool:
    return value is None or (isinstance(value, str) and REFERENCE.match(value) is not None)


def _walk(value: Any, path: str, named: bool = False) -> Iterator[tuple[str, str]]:
    if named:
        if _unset_or_reference(value):
            return
        yield path, "holds a secret: give a reference (env:NAME, file:PATH or secret:NAME), never the value"
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _walk(inner, f"{path}.{key}" if path else str(key), secret_named(str(key)))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _walk(inner, f"{path}[{i}]")
    elif isinstance(value, str):
        problem = value_problem(value)
        if problem is not None:
            yield path, problem


def literal_credentials(value: Any, path: str) -> list[tuple[str, str]]:
    """(field path, what is wrong) for every literal credential under `value`."""
    return list(_walk(value, path))


def redact_credentials(value: Any) -> Any:
    """`value` with every literal credential replaced by "[redacted]" (for what older versions stored)."""
    if isinstance(value, dict):
        return {k: "[redacted]" if secret_named(str(k)) and not _unset_or_reference(v) else redact_credentials(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_credentials(v) for v in value]
    if isinstance(value, str) and value_problem(value) is not None:
        return "[redacted]"
    return value
