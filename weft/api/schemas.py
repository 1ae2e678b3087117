"""Request bodies as pydantic models: strict JSON types, field-level errors, JSON Schema for OpenAPI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from weft.core.protocol import CAPABILITY


class Body(BaseModel):
    # Unknown fields are ignored, as existing clients send extras; types are strict (no "5" for 5).
    model_config = ConfigDict(strict=True, extra="ignore")


class WorkSubmit(Body):
    taskId: str | None = Field(None, min_length=1, max_length=256)
    boundary: str = Field(min_length=1, max_length=128)
    capability: str = Field(pattern=CAPABILITY)
    description: str = Field(min_length=1)  # length: WEFT_MAX_DESCRIPTION_CHARS (weft.core.limits)
    priority: int = Field(5, ge=1, le=10)
    preferredAgentType: str | None = Field(None, min_length=1, max_length=64)
    requiredAgentType: str | None = Field(None, min_length=1, max_length=64)
    deadline: datetime | None = None
    contextData: dict[str, Any] | None = None
    maxAttempts: int = Field(3, ge=1, le=100)


class Reason(Body):
    reason: str | None = Field(None, max_length=2000)


class WorkFilter(Body):
    status: str | None = None
    boundary: str | None = None
    capability: str | None = None
    minPriority: int | None = Field(None, ge=1, le=10)
    assignedTo: str | None = None


class CancelBatch(Body):
    workItemIds: list[str] | None = Field(None, max_length=10_000)
    filter: WorkFilter | None = None
    reason: str | None = Field(None, max_length=2000)
    reassign: bool = False

    @model_validator(mode="after")
    def one_selector(self) -> CancelBatch:
        if (self.workItemIds is None) == (self.filter is None):
            raise ValueError("give exactly one of workItemIds or filter")
        return self


class Shutdown(Body):
    graceful: bool = True
    reason: str = Field("manual", min_length=1, max_length=200)
    gracePeriodMs: int | None = Field(None, ge=0, le=86_400_000)


class AgentFilter(Body):
    status: str | None = None
    idleTimeMs: int | None = Field(None, ge=0)
    agentType: str | None = None
    boundary: str | None = None
    capability: str | None = None


class ShutdownBatch(Body):
    agentGuids: list[str] | None = Field(None, max_length=10_000)
    filter: AgentFilter | None = None
    graceful: bool = True
    gracePeriodMs: int | None = Field(None, ge=0, le=86_400_000)
    reason: str = Field("manual", min_length=1, max_length=200)

    @model_validator(mode="after")
    def one_selector(self) -> ShutdownBatch:
        if (self.agentGuids is None) == (self.filter is None):
            raise ValueError("give exactly one of agentGuids or filter")
        return self


class TargetFilter(Body):
    agentType: str | None = None
    status: str | None = None
    mechanism: str | None = None


class DisableBatch(Body):
    targetIds: list[str] | None = Field(None, max_length=10_000)
    filter: TargetFilter | None = None
    preventSpinUp: bool = True
    reason: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def one_selector(self) -> DisableBatch:
        if (self.targetIds is None) == (self.filter is None):
            raise ValueError("give exactly one of targetIds or filter")
        return self


class SpinUpRequest(Body):
    workItemId: str | None = None


class TargetRegister(Body):
    """Documented shape; validation proper is weft.core.targets (it accepts nested and flat config)."""

    model_config = ConfigDict(extra="allow")
    name: str
    agentType: str
    mechanism: str
    capabilities: list[str]
    boundaries: list[str] | None = None
    description: str | None = None
    config: dict[str, Any] | None = None
    healthCheck: dict[str, Any] | None = None
    maxConcurrentAgents: int | None = None
    cooldownMs: int | None = None
    spinUpTimeoutMs: int | None = None
    tags: list[str] | None = None
