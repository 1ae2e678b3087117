"""Logging setup: text for people, one JSON object a line with LOG_FORMAT=json.

`project` and `correlation_id` ride in context variables, so every line logged while a request or
event is handled carries them without threading them through every call.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

import orjson

project_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("project", default=None)
correlation_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "project"):
            record.project = project_var.get()
        if not hasattr(record, "correlation_id"):
            record.correlation_id = correlation_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and value is not None:
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = [f"{k}={getattr(record, k)}" for k in ("project", "correlation_id") if getattr(record, k, None)]
        return f"{base} [{' '.join(ctx)}]" if ctx else base


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
