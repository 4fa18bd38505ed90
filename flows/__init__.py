"""Prefect flows (extract, train, evaluate, sweep, pipeline), deployments and the ``mm`` CLI."""
