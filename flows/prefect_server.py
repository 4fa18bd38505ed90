"""The temporary Prefect server a command starts dies with that command, even when it is SIGKILLed.

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
import warnings

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine waits
