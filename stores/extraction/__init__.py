"""Sources into the feature store: batched, resumable extraction on local threads (``local``) or as one streaming
Ray Data job (``ray``), migration of stores of the old layout (``migrate``), and the record that lets a rerun on
unchanged shards skip the source (``freshness``). Imports ``models`` and the other ``stores`` packages."""
from models.records import ExtractReport

from .local import extract

__all__ = ["ExtractReport", "extract"]
