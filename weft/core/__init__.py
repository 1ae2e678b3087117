"""Pure decisions: routing, fleet policy, retention, target validation, the agent protocol's shapes.

No I/O, no clock, no asyncio here: every function takes the state and the time it decides at, and
returns what should happen. mypy runs strict on this package.
"""
