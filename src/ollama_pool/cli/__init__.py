"""The ``ollama-pool`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="ollama-pool")
def main() -> None:
    """Run a pool of Ollama instances and jobs on it."""


# Each module registers its commands on ``main`` when imported.
from ollama_pool.cli import _batch, _manager  # noqa: E402, F401
