"""The Prefect tasks flows call for every unit of work (extract, migrate, version, train, reproduce, evaluate,
tune, report, champions): retries, content- and code-keyed caching and logging live here, logic does not.
Imports ``models``, ``stores`` and ``runs``."""
