"""Errors the layers above turn into one line and exit code 2 (never retried)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work: refused before anything runs."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line for a user (its first line, cut at ``limit``; its type when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
