"""A LangChain callback handler that records which instance served each call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult


@dataclass(frozen=True)
class ModelCall:
    """One chat model call of a record: where it ran, how long, how many tokens."""

    instance: str | None
    latency: float | None
    input_tokens: int
    output_tokens: int
    total_tokens: int


class CallTracker(BaseCallbackHandler):
    """Collects the model calls made while a chain handles one record.

    Attach a new tracker per record (`config={"callbacks": [tracker]}`), so it
    works for any chain that calls a chat model. The instance comes from
    `response_metadata["instance"]`, which `PooledChatOllama` sets on each
    message, and the token counts from `usage_metadata`. A model call nested in
    another model call (a wrapper model calling its backend) is not counted
    twice: only the outer call is recorded.
    """

    # Run the hooks in the event loop thread instead of a thread pool: they are
    # quick, and the tracker is used by one record at a time.
    run_inline = True

    def __init__(self) -> None:
        self.calls: list[ModelCall] = []
        self._started_at: dict[UUID, float] = {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self._started_at[run_id] = time.monotonic()

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self._started_at[run_id] = time.monotonic()

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        started_at = self._started_at.pop(run_id, None)
        if parent_run_id is not None and parent_run_id in self._started_at:
            return
        latency = None if started_at is None else time.monotonic() - started_at
        self.calls.append(_model_call(response, latency))

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self._started_at.pop(run_id, None)

    @property
    def instance(self) -> str | None:
        """The instance of the last model call that reported one."""
        for call in reversed(self.calls):
            if call.instance is not None:
                return call.instance
        return None


def _model_call(response: LLMResult, latency: float | None) -> ModelCall:
    if not response.generations or not response.generations[0]:
        return ModelCall(None, latency, 0, 0, 0)
    generation = response.generations[0][0]
    message = getattr(generation, "message", None)
    if not isinstance(message, BaseMessage):
        return ModelCall(None, latency, 0, 0, 0)

    # LangChain copies generation_info into response_metadata before on_llm_end;
    # generation_info is the fallback for models that skip that step.
    instance = message.response_metadata.get("instance")
    if instance is None:
        instance = (generation.generation_info or {}).get("instance")
    usage = getattr(message, "usage_metadata", None) or {}
    return ModelCall(
        instance=instance if isinstance(instance, str) else None,
        latency=latency,
        input_tokens=int(usage.get("input_tokens", 0)),
        output_tokens=int(usage.get("output_tokens", 0)),
        total_tokens=int(usage.get("total_tokens", 0)),
    )
