"""`weft tokens add|list|remove --file F`: manage the scoped token file (README: Security).

`add` draws a token, prints it once and stores only its scrypt hash; a running weft picks the
change up within a second.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from weft.core.access import (
    Principal,
    Role,
    ScryptParams,
    TokenEntry,
    TokenFile,
    TokenFileError,
    parse_token_file,
)
from weft.token_file import read_token_file


def add_token_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tokens = sub.add_parser("tokens", help="manage the scoped token file (WEFT_TOKENS_FILE)")
    verbs = tokens.add_subparsers(dest="tokens_command", required=True)
    default = os.environ.get("WEFT_TOKENS_FILE")
    for name, text in (("add", "create a token: prints it once, stores its hash"), ("list", "names, roles, projects"),
                       ("remove", "revoke a token by name")):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("--file", type=Path, default=default, required=default is None,
                          help="the token file (default: $WEFT_TOKENS_FILE)")
        if name != "list":
            verb.add_argument("--name", required=True)
        if name == "add":
            verb.add_argument("--role", required=True, choices=[r.name for r in Role])
            verb.add_argument("--projects", required=True, help='comma-separated project ids, or "*" for all')


def run_tokens(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        current = read_token_file(path) if path.exists() else TokenFile(ScryptParams(salt=secrets.token_bytes(16)), ())
    except TokenFileError as err:
        print(f"weft: {err}", file=sys.stderr)
        return 2
    if args.tokens_command == "list":
        for e in current.entries:
            shown = "*" if e.principal.projects is None else ",".join(sorted(e.principal.projects))
            print(f"{e.principal.name}\t{e.principal.role.name}\t{shown}")
        return 0
    others = tuple(e for e in current.entries if e.principal.name != args.name)
    if args.tokens_command == "remove":
        if len(others) == len(current.entries):
            print(f"weft: no token named {args.name!r} in {path}", file=sys.stderr)
            return 1
        return _write(path, TokenFile(current.params, others))
    if len(others) != len(current.entries):
        print(f"weft: a token named {args.name!r} exists; remove it first", file=sys.stderr)
        return 1
    token = "weft_" + secrets.token_urlsafe(32)
    projects = None if args.projects.strip() == "*" else frozenset(p.strip() for p in args.projects.split(",") if p.strip())
    entry = TokenEntry(Principal(args.name, Role[args.role], projects), current.params.hash(token))
    updated = TokenFile(current.params, (*current.entries, entry))
    try:
        parse_token_file(updated.to_json())  # the same checks the server applies (names, projects)
    except TokenFileError as err:
        print(f"weft: {err}", file=sys.stderr)
        return 2
    code = _write(path, updated)
    if code == 0:
        print(token)
        print(f"# token {args.name!r} ({args.role}, projects {args.projects}): shown once, stored hashed in {path}",
              file=sys.stderr)
    return code


def _write(path: Path, tokens: TokenFile) -> int:
    """Atomically, readable by the owner only (it holds hashes, but of credentials)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(tokens.to_json() + b"\n")
    os.replace(tmp, path)
    return 0
