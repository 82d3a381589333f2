"""The batch command: a JSONL file of questions through a chain on the pool."""
