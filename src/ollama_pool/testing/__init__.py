"""An Ollama stand-in server for tests, benchmarks and local runs."""
