"""Schemathesis fuzzing of the REST API against its own OpenAPI document (`make fuzz`)."""
