"""The top layer: Prefect flows (extract, migrate, train, reproduce, evaluate, sweep, pipeline, tune) that compose
``tasks`` only, their task runners (process pool, Ray), cron deployments, the console and the ``mm`` CLI (which may
read ``stores`` directly for queries and store info)."""
