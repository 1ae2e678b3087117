"""Leadership command: a scheduler that won a project's lease announces its term in the stream."""

from __future__ import annotations

from collections.abc import Callable

from projections.events import Event
from projections.state import ProjectState
from weft.commands.core import CommandsBase, Ctx, Outcome
from weft.core.errors import Fenced


def term_epoch(state: ProjectState, lease_revision: int) -> int:
    """A new term's epoch: above every epoch the stream has seen, so it stays monotonic per project
    even when the lease bucket is recreated and its revisions start again at 1."""
    return max(lease_revision, state.epoch + 1)


class LeadershipCommands(CommandsBase):
    async def announce_leader(
        self, ctx: Ctx, holder: str, lease_revision: int, still_leader: Callable[[], bool]
    ) -> tuple[Outcome, int]:
        """Append `leader.elected` with the term's epoch; returns the outcome and the epoch. From its
        sequence on, the fold ignores every decision of an older epoch, however late it lands.
        The caller must have caught up with the stream first (every epoch in it seen)."""
        chosen: list[int] = []

        def decide(state: ProjectState) -> Event:
            if not still_leader():  # a lapsed lease must not fence the holder that took it over
                raise Fenced(f"lease of {ctx.project} lapsed before the term was announced")
            epoch = term_epoch(state, lease_revision)
            chosen.append(epoch)
            data = {"holder": holder, "leaseRevision": lease_revision}
            return self.event(ctx, "leader.elected", ctx.project, data, epoch=epoch)

        outcome = await self.execute(ctx, f"project.{ctx.project}", decide)
        return outcome, chosen[-1]
