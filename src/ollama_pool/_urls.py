"""URL and model-name helpers."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

import httpx


def redact_url(url: str) -> str:
    """Return `url` with the password of its user info replaced by `***`.

    `http://user:secret@host:11434` becomes `http://user:***@host:11434`. A URL
    without a password comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    userinfo, separator, hostport = parts.netloc.rpartition("@")
    if not separator or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def normalize_model(name: str) -> str:
    """Return the canonical form of an Ollama model name.

    Ollama treats a name without a tag as the `latest` tag, and fills in the
    default registry and namespace, which /api/tags leaves out: `llama3.2`,
    `library/llama3.2` and `registry.ollama.ai/library/llama3.2:latest` are all
    `llama3.2:latest`.
    """
    name = name.strip()
    if name.count("/") == 2:
        name = name.removeprefix("registry.ollama.ai/")
    if name.count("/") == 1:
        name = name.removeprefix("library/")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{name}:latest"
    return name


def scrub_secret(text: str, base_url: str) -> str:
    """Return `text` with the password of `base_url` masked wherever it appears."""
    try:
        userinfo, separator, _ = urlsplit(base_url).netloc.rpartition("@")
    except ValueError:
        return text
    password = userinfo.split(":", 1)[1] if separator and ":" in userinfo else ""
    if not password:
        return text
    return text.replace(base_url, redact_url(base_url)).replace(password, "***")


def split_credentials(url: str) -> tuple[str, httpx.BasicAuth | None]:
    """Return `url` without its user info, and that user info as basic auth."""
    parts = urlsplit(url)
    userinfo, separator, hostport = parts.netloc.rpartition("@")
    if not separator:
        return url, None
    user, _, password = userinfo.partition(":")
    plain = urlunsplit(
        (parts.scheme, hostport, parts.path, parts.query, parts.fragment)
    )
    return plain, httpx.BasicAuth(unquote(user), unquote(password))
