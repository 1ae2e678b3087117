"""The spin-up allow-list (pure): which mechanisms, hosts, commands and images a project's targets
may use, from the server's own configuration (WEFT_SPINUP_POLICY_FILE; README: Security).

A target is checked when it is registered or updated, and again before each launch and probe, so a
policy tightened after registration still holds. The file is JSON:

    {"projects": {"*":       {"mechanisms": ["ssh", "kubernetes"], "hosts": ["*.build.example.com"]},
                  "sandbox": {"mechanisms": ["local"], "commands": ["weft-agent", "/opt/agents/*"]}}}

A project uses its own entry, else `*`; a project with neither may not spin up anything. Within an
entry a list left out does not restrict (an empty list allows nothing). Entries match with shell
globs (`fnmatch`, case-sensitive; hosts compared lower-case). Without a file every target is allowed,
as before.
"""

from __future__ import annotations

import fnmatch
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from weft.core.errors import Forbidden

KINDS = ("mechanisms", "hosts", "commands", "images")
DEFAULT_GITHUB_HOST = "api.github.com"


class PolicyFileError(ValueError):
    """The policy file does not parse; the message says where."""


@dataclass(frozen=True)
class Rules:
    """One project's entry: per kind, the allowed patterns (None: not restricted)."""

    mechanisms: tuple[str, ...] | None = None
    hosts: tuple[str, ...] | None = None
    commands: tuple[str, ...] | None = None
    images: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SpinUpPolicy:
    """None for `projects` means no policy is configured: everything is allowed."""

    projects: Mapping[str, Rules] | None = None

    def rules_for(self, project: str) -> Rules | None:
        if self.projects is None:
            return Rules()
        return self.projects.get(project, self.projects.get("*"))

    def check(self, project: str, target: Mapping[str, Any]) -> None:
        """Raise Forbidden naming the first field of `target` the policy does not allow."""
        problem = self.problem(project, target)
        if problem is not None:
            field, message = problem
            raise Forbidden(message, field=field, details={"setting": "WEFT_SPINUP_POLICY_FILE"})

    def problem(self, project: str, target: Mapping[str, Any]) -> tuple[str, str] | None:
        rules = self.rules_for(project)
        if rules is None:
            return "mechanism", f"project {project} may not spin up agents (no entry in the spin-up policy)"
        for kind, field, value in uses(target):
            allowed = getattr(rules, kind)
            if allowed is not None and not any(_match(kind, value, p) for p in allowed):
                return field, (f"{field} ({_describe(kind)} {value!r}) is not allowed by the spin-up policy "
                               f"for project {project}")
        return None


def _describe(kind: str) -> str:
    return {"mechanisms": "mechanism", "hosts": "host", "commands": "command", "images": "image"}[kind]


def _match(kind: str, value: str, pattern: str) -> bool:
    if kind == "hosts":
        return fnmatch.fnmatchcase(value.lower(), pattern.lower())
    return fnmatch.fnmatchcase(value, pattern)


def _host(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _program(command: Any) -> str | None:
    if isinstance(command, list):
        return command[0] if command and isinstance(command[0], str) else None
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError:
            return command
        return argv[0] if argv else None
    return None


def uses(target: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(kind, field, value) for every mechanism, host, command and image a stored target names."""
    mechanism = str(target.get("mechanism"))
    yield "mechanisms", "mechanism", mechanism
    config = target.get("config") or {}
    for key, body in config.items():
        if not isinstance(body, dict):
            continue
        where = f"config.{key}"
        if key == "ssh" and isinstance(body.get("host"), str):
            yield "hosts", f"{where}.host", body["host"]
        for name in ("url", "stopUrl", "apiServer", "apiUrl"):
            host = _host(body.get(name))
            if host:
                yield "hosts", f"{where}.{name}", host
        check = body.get("healthCheck")
        if isinstance(check, dict) and _host(check.get("url")):
            yield "hosts", f"{where}.healthCheck.url", str(_host(check.get("url")))
        if key == "githubActions" and not body.get("apiUrl"):
            yield "hosts", f"{where}.apiUrl", DEFAULT_GITHUB_HOST
        program = _program(body.get("command"))
        if program:
            yield "commands", f"{where}.command", program
        if isinstance(body.get("image"), str):
            yield "images", f"{where}.image", body["image"]


def parse_policy(raw: bytes) -> SpinUpPolicy:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise PolicyFileError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("projects"), dict):
        raise PolicyFileError('must be an object {"projects": {"<project or *>": {...}}}')
    projects: dict[str, Rules] = {}
    for name, entry in doc["projects"].items():
        if not isinstance(entry, dict):
            raise PolicyFileError(f"projects.{name} must be an object")
        unknown = sorted(set(entry) - set(KINDS))
        if unknown:
            raise PolicyFileError(f"projects.{name}.{unknown[0]} is not one of {', '.join(KINDS)}")
        lists: dict[str, tuple[str, ...]] = {}
        for kind, patterns in entry.items():
            if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
                raise PolicyFileError(f"projects.{name}.{kind} must be a list of non-empty strings")
            lists[kind] = tuple(patterns)
        projects[name] = Rules(**lists)
    return SpinUpPolicy(projects)


ALLOW_ALL = SpinUpPolicy()
