"""A replica's actors: the scheduler that executes the leader's plan, the agent-protocol gateway,
the fleet executor that performs spin-ups and scale-downs, and the Warp bridge."""
