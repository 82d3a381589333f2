"""The batch runner: a JSONL file of records through a LangChain chain on a pool.

`run_batch` / `arun_batch` read the input lazily, run each record through the
chain with N asyncio workers, and append one JSON line per record to the output
file: the answer, the instance that served it, latency and tokens, or an error.
A run can be killed at any moment and resumed; see docs/batch.md.
"""

from ollama_pool.batch._chain import (
    DEFAULT_CHAIN,
    ChainFactory,
    answer_text,
    build_chain,
    load_chain_factory,
)
from ollama_pool.batch._errors import (
    BatchError,
    ChainLoadError,
    ChainOutputError,
    DuplicateIdError,
    InvalidRecordError,
    OutputLockedError,
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
