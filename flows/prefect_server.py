"""Which Prefect server a command runs its flows on, and a temporary one that dies with its command.

With ``PREFECT_API_URL`` unset, a command uses the Prefect server ``mm serve`` runs on this machine when one
answers (``MM_PREFECT_LOCAL_URL``, default ``http://127.0.0.1:4200/api``): its runs then show in that UI, and the
command skips the ~10 s start of a temporary server. Otherwise it starts a temporary one, which ends with it:

Prefect's ephemeral server is a ``uvicorn`` child started by ``prefect.server.api.server.SubprocessASGIServer``
and stopped by an ``atexit`` hook, which a SIGKILL (or the out-of-memory killer) never runs: the server is left
orphaned on its port. On Linux, ``PR_SET_PDEATHSIG`` makes the kernel send the child SIGTERM when its parent
dies; Prefect exposes no hook for the child's start, so this gives the ``subprocess`` module that Prefect's server
module uses a ``Popen`` that sets it (the rest of ``subprocess`` unchanged, nothing else in the process touched).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import types
import urllib.request
import warnings
from contextlib import contextmanager
from typing import Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCAL_URL = "http://127.0.0.1:4200/api"  # where `mm serve` starts Prefect's server by default


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _ServerPopen(subprocess.Popen):
    """``Popen`` whose child gets SIGTERM when its parent dies. The kernel ties that signal to the forking
    thread, not the process: only a child started from the main thread (where Prefect starts its server) gets it,
    so that a server started from a short-lived thread is not stopped with that thread."""

    def __init__(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            super().__init__(*args, **kwargs)
            return
        kwargs.setdefault("preexec_fn", _die_with_parent)
        with warnings.catch_warnings():  # a preexec_fn runs Python's fork hooks; lancedb's warns, then exec follows
            warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
            super().__init__(*args, **kwargs)


def bind_to_this_process() -> None:
    """Make every ephemeral Prefect server this process starts end with it (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.server.api import server

    if getattr(server.subprocess, "Popen", None) is _ServerPopen:
        return
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(subprocess.__dict__)
    shim.Popen = _ServerPopen
    server.subprocess = shim


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Prefect API answers its health check at ``url`` (quickly: nothing there is the usual case)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


@contextmanager
def flow_api() -> Iterator[str | None]:
    """Run a command's flows on ``PREFECT_API_URL``, else on the local server when it answers (set for this
    process and its workers), else on a temporary server bound to this process. Yields the URL (None:
    temporary)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    local = os.environ.get("MM_PREFECT_LOCAL_URL", LOCAL_URL)
    if not answers(local):
        bind_to_this_process()
        yield None
        return
    os.environ["PREFECT_API_URL"] = local  # worker processes inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: local}):
            yield local
    finally:
        os.environ.pop("PREFECT_API_URL", None)


os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine waits
