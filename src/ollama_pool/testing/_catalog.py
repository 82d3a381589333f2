"""Model names, metadata and the models directory shared by stand-in servers.

A pulled model is stored like Ollama stores it: a manifest file at
`MODELS/manifests/registry.ollama.ai/NAMESPACE/MODEL/TAG`, so every stand-in that
uses the same directory lists it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
_FAMILY = re.compile(r"[a-z]+")
_SIZE_TAG = re.compile(r"^(\d+(?:\.\d+)?)([bm])\b", re.IGNORECASE)


def normalize_model(name: str) -> str:
    """Return the model name with its tag, `llama3.2` -> `llama3.2:latest`.

    The default registry and namespace are dropped, as in the names /api/tags
    lists: `registry.ollama.ai/library/llama3.2` -> `llama3.2:latest`.
    """
    if name.count("/") == 2:
        name = name.removeprefix(f"{REGISTRY}/")
    if name.count("/") == 1:
        name = name.removeprefix(f"{DEFAULT_NAMESPACE}/")
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


def rfc3339(timestamp: float) -> str:
    """Format a POSIX timestamp the way Ollama does, with the local UTC offset."""
    return datetime.fromtimestamp(timestamp, timezone.utc).astimezone().isoformat()


def model_digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def model_size(name: str) -> int:
    """Return a made-up but stable size in bytes, between 1 and 5 GB."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return 1_000_000_000 + seed % 4_000_000_000


def model_details(name: str) -> dict[str, Any]:
    base, _, tag = name.rpartition("/")[2].partition(":")
    match = _FAMILY.match(base.lower())
    family = match.group(0) if match else "llama"
    size_match = _SIZE_TAG.match(tag)
    if size_match:
        parameter_size = size_match.group(1) + size_match.group(2).upper()
    else:
        parameter_size = "3.2B"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size,
        "quantization_level": "Q4_K_M",
    }


def capabilities(name: str) -> list[str]:
    if "embed" in name:
        return ["embedding"]
    return ["completion", "tools"]


def tags_entry(name: str, modified: float) -> dict[str, Any]:
    """Build the /api/tags entry of one model."""
    return {
        "name": name,
        "model": name,
        "modified_at": rfc3339(modified),
        "size": model_size(name),
        "digest": model_digest(name).removeprefix("sha256:"),
        "details": model_details(name),
    }


def show_response(name: str, modified: float) -> dict[str, Any]:
    """Build the /api/show response of one model."""
    details = model_details(name)
    family = details["family"]
    return {
        "license": "stand-in model, no license",
        "modelfile": f"# Modelfile of the stand-in model {name}\nFROM {name}\n",
        "parameters": 'stop                           "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": details,
        "model_info": {
            "general.architecture": family,
            "general.parameter_count": model_size(name) * 2,
            f"{family}.context_length": 131072,
            f"{family}.embedding_length": 3072,
        },
        "capabilities": capabilities(name),
        "modified_at": rfc3339(modified),
    }


class ModelsDirectory:
    """Manifests of pulled models under one models directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def manifest_path(self, name: str) -> Path:
        repository, _, tag = normalize_model(name).rpartition(":")
        parts = repository.split("/")
        if not is_safe_name(name):
            raise ValueError(f"invalid model name {name!r}")
        if len(parts) == 1:
            parts = [REGISTRY, DEFAULT_NAMESPACE, *parts]
        elif len(parts) == 2:
            parts = [REGISTRY, *parts]
        return self.root.joinpath("manifests", *parts, tag)

    def has(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def modified(self, name: str) -> float | None:
        try:
            return self.manifest_path(name).stat().st_mtime
        except OSError:
            return None

    def list(self) -> dict[str, float]:
        """Return every stored model with its modification time."""
        found: dict[str, float] = {}
        manifests = self.root / "manifests"
        for path in manifests.glob("*/*/*/*"):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model = path.parts[-4:-1]
            repository = (
                model if namespace == DEFAULT_NAMESPACE else f"{namespace}/{model}"
            )
            if host != REGISTRY:
                repository = f"{host}/{namespace}/{model}"
            found[f"{repository}:{path.name}"] = path.stat().st_mtime
        return found

    def write(self, name: str) -> None:
        """Store the manifest of a pulled model; readers never see a partial file."""
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "layers": [
                {
                    "mediaType": "application/vnd.ollama.image.model",
                    "digest": model_digest(name),
                    "size": model_size(name),
                }
            ],
        }
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".pull-")
        with os.fdopen(descriptor, "w") as file:
            json.dump(manifest, file)
        os.replace(temporary, path)


def normalized_set(names: Iterable[str]) -> set[str]:
    return {normalize_model(name) for name in names}


def is_safe_name(name: str) -> bool:
    """Tell whether `name` maps to a path inside the models directory.

    Real Ollama rejects such names with 400; here any name is allowed except one
    whose path parts are empty, `.` or `..`, or that contains a backslash.
    """
    repository, _, tag = normalize_model(name).rpartition(":")
    parts = [*repository.split("/"), tag]
    return "\\" not in name and all(part not in ("", ".", "..") for part in parts)
