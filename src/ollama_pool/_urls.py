"""URL and model-name helpers."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Return `url` with the password of its user info replaced by `***`.

    `http://user:secret@host:11434` becomes `http://user:***@host:11434`. A URL
    without a password comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    netloc = f"{user}:***@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def normalize_model(name: str) -> str:
    """Return the canonical form of an Ollama model name.

    Ollama treats a name without a tag as the `latest` tag, so `llama3.2` and
    `llama3.2:latest` are the same model.
    """
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{name}:latest"
    return name


def scrub_secret(text: str, base_url: str) -> str:
    """Return `text` with the password of `base_url` masked wherever it appears."""
    try:
        password = urlsplit(base_url).password
    except ValueError:
        return text
    if not password:
        return text
    return text.replace(base_url, redact_url(base_url)).replace(password, "***")
