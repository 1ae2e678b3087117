"""Command handlers, split by resource.

`core` holds the generic loop (`CommandsBase`) and its value types; `work`, `agents` and `targets`
each hold one resource's commands as a mixin. `Commands` combines them; importers use this package.
"""

from __future__ import annotations

from weft.commands.agents import AgentCommands
from weft.commands.core import (
    BATCH_CONCURRENCY,
    MAX_ATTEMPTS,
    BatchOutcome,
    CommandsBase,
    Ctx,
    Decide,
    Outcome,
)
from weft.commands.leadership import LeadershipCommands, term_epoch
from weft.commands.targets import TargetCommands, find_target
from weft.commands.work import RetryPolicy, WorkCommands

__all__ = [
    "BATCH_CONCURRENCY",
    "MAX_ATTEMPTS",
    "AgentCommands",
    "BatchOutcome",
    "Commands",
    "CommandsBase",
    "Ctx",
    "Decide",
    "LeadershipCommands",
    "Outcome",
    "RetryPolicy",
    "TargetCommands",
    "WorkCommands",
    "find_target",
    "term_epoch",
]


class Commands(WorkCommands, AgentCommands, TargetCommands, LeadershipCommands):
    """Every command handler: work items, agents, targets, spin-ups and leadership over one
    `CommandsBase` loop."""
