"""The batch runner: a JSONL file of records through a LangChain chain on a pool.

`run_batch` / `arun_batch` read the input lazily, run each record through the
chain with N asyncio workers, and append one JSON line per record to the output
file: the answer, the instance that served it, latency and tokens, or an error.
A run can be killed at any moment and resumed; see docs/batch.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ollama_pool.batch._constants import DEFAULT_CHAIN
from ollama_pool.batch._errors import (
    BatchError,
    ChainLoadError,
    ChainOutputError,
    DuplicateIdError,
    InvalidRecordError,
    OutputLockedError,
)

if TYPE_CHECKING:
    from ollama_pool.batch._chain import (
        ChainFactory,
        answer_text,
        build_chain,
        load_chain_factory,
    )
    from ollama_pool.batch._output import OutputState, prepare_output
    from ollama_pool.batch._progress import NoProgress, ProgressReporter, RichProgress
    from ollama_pool.batch._runner import (
        BatchOptions,
        arun_batch,
        default_workers,
        redact_urls,
        run_batch,
    )
    from ollama_pool.batch._summary import BatchSummary
    from ollama_pool.batch._tracking import CallTracker, ModelCall

# Names whose modules import LangChain or rich, which take a second or more to
# load. They load on first access, so that `ollama-pool --help` starts fast.
_LAZY_NAMES = {
    "BatchOptions": "ollama_pool.batch._runner",
    "BatchSummary": "ollama_pool.batch._summary",
    "CallTracker": "ollama_pool.batch._tracking",
    "ChainFactory": "ollama_pool.batch._chain",
    "ModelCall": "ollama_pool.batch._tracking",
    "NoProgress": "ollama_pool.batch._progress",
    "OutputState": "ollama_pool.batch._output",
    "ProgressReporter": "ollama_pool.batch._progress",
    "RichProgress": "ollama_pool.batch._progress",
    "answer_text": "ollama_pool.batch._chain",
    "arun_batch": "ollama_pool.batch._runner",
    "build_chain": "ollama_pool.batch._chain",
    "default_workers": "ollama_pool.batch._runner",
    "load_chain_factory": "ollama_pool.batch._chain",
    "prepare_output": "ollama_pool.batch._output",
    "redact_urls": "ollama_pool.batch._runner",
    "run_batch": "ollama_pool.batch._runner",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ollama_pool.batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CHAIN",
    "BatchError",
    "BatchOptions",
    "BatchSummary",
    "CallTracker",
    "ChainFactory",
    "ChainLoadError",
    "ChainOutputError",
    "DuplicateIdError",
    "InvalidRecordError",
    "ModelCall",
    "NoProgress",
    "OutputLockedError",
    "OutputState",
    "ProgressReporter",
    "RichProgress",
    "answer_text",
    "arun_batch",
    "build_chain",
    "default_workers",
    "load_chain_factory",
    "prepare_output",
    "redact_urls",
    "run_batch",
]
