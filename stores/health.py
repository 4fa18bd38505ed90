"""Waiting for an HTTP service (MLflow tracking server, Prefect API) with bounded retries."""
from __future__ import annotations

import time
import urllib.error
import urllib.request


class ServiceUnreachable(RuntimeError):
    """A configured server did not answer its health endpoint in time."""


def wait_healthy(url: str, timeout_s: float, what: str, hint: str) -> None:
    """GET ``url`` until it answers 200, backing off from 0.5 s to 5 s; after ``timeout_s`` raise
    ServiceUnreachable naming the service, the URL, the last error and ``hint``."""
    deadline, wait = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
                err = f"HTTP {r.status}"
        except (OSError, urllib.error.URLError) as e:
            err = str(getattr(e, "reason", e))
        if time.monotonic() + wait > deadline:
            raise ServiceUnreachable(f"{what} at {url} is unreachable after {timeout_s:g} s ({err}); {hint}")
        time.sleep(wait)
        wait = min(wait * 2, 5.0)
