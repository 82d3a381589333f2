"""Defaults of the batch runner, in a module that imports nothing heavy."""

DEFAULT_CHAIN = "ollama_pool.rag.musique:build_chain"
