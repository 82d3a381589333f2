"""Commands that start, stop and inspect local Ollama instances."""
