"""Benchmarks of ollama-pool: run `python -m benchmarks --help` from the repo root."""
