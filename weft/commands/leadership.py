"""Leadership command: a scheduler that won a project's lease announces its term in the stream.

The decision is `weft.core.decisions.leadership`; whether the lease is still held is asked here.
"""

from __future__ import annotations

from collections.abc import Callable

from projections.events import Event
from projections.state import ProjectState
from weft.commands.core import CommandsBase, Ctx, Outcome
from weft.core.decisions import leadership as decisions
from weft.core.decisions.leadership import term_epoch
from weft.core.errors import Fenced

__all__ = ["LeadershipCommands", "term_epoch"]


class LeadershipCommands(CommandsBase):
    async def announce_leader(
        self, ctx: Ctx, holder: str, lease_revision: int, still_leader: Callable[[], bool]
    ) -> tuple[Outcome, int]:
        """Append `leader.elected` with the term's epoch; returns the outcome and the epoch. From its
        sequence on, the fold ignores every decision of an older epoch, however late it lands.
        The caller must have caught up with the stream first (every epoch in it seen)."""
        chosen: list[int] = []

        def decide(state: ProjectState) -> Event | None:
            if not still_leader():  # a lapsed lease must not fence the holder that took it over
                raise Fenced(f"lease of {ctx.project} lapsed before the term was announced")
            draft = decisions.announce_leader(state, ctx.project, holder, lease_revision)
            assert draft.epoch is not None
            chosen.append(draft.epoch)
            return self.emit(ctx, draft)

        outcome = await self.execute(ctx, f"project.{ctx.project}", decide)
        return outcome, chosen[-1]
