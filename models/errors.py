"""Errors the layers above turn into one line and exit code 2 (never retried)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work: refused before anything runs."""
