"""Pure projections: events in, state out. No I/O, no clock reads; time comes from the events."""

from projections.fold import apply, fold
from projections.state import ProjectState, decode_state, encode_state, state_hash

__all__ = ["ProjectState", "apply", "decode_state", "encode_state", "fold", "state_hash"]
