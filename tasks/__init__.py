"""Thin Prefect tasks over stores/: retries, content-keyed caching and logging live here, logic does not."""
