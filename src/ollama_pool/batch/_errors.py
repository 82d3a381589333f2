"""Errors of the batch runner.

Per-record errors (`InvalidRecordError`, `DuplicateIdError`, `ChainOutputError`)
end up as error lines in the output file; the others stop the whole run.
"""

from __future__ import annotations

from ollama_pool._errors import OllamaPoolError


class BatchError(OllamaPoolError):
    """Base class of the errors raised by the batch runner."""


class InvalidRecordError(BatchError):
    """An input line is not a JSON object with a usable id and question."""


class DuplicateIdError(BatchError):
    """An input record repeats the id of an earlier record."""


class ChainOutputError(BatchError):
    """A chain returned something that is neither a string nor a message."""


class ChainLoadError(BatchError):
    """A `module:function` chain spec could not be imported or called."""


class OutputLockedError(BatchError):
    """Another batch run is writing the same output file."""
