"""The ``mm`` process's policy for Python's cyclic garbage collector.

A command imports about a million objects (torch, lancedb, Prefect, MLflow) that live as long as the process, and
every full collection walks all of them again: 1.7-2 s of a 200-row ``mm train`` went to collections during the
run, and 2-3 s more to the interpreter's exit, whose finalisation collects the whole heap once more (py-spy,
bench/RESULTS.md "Issue 21, twelfth pass"). So, in the console script only (``running``; ``main`` called from
Python changes nothing):

- the command's modules are imported with the collector paused, and what they built is then frozen
  (``gc.freeze``: moved to a permanent generation that later collections skip); the collector runs again for the
  command's work, so the cyclic garbage of a long training or extraction is still collected;
- at exit the heap is frozen: the operating system takes the memory back without a last walk over it. What must
  happen at exit still does: ``atexit`` handlers (Prefect's and MLflow's flushes, ``weakref.finalize``) run, and
  the interpreter flushes the standard streams; only cyclic garbage is left to the operating system. (Not in the
  sweep's worker processes: freezing theirs at exit changed a 2-run sweep by less than its run-to-run spread.)
"""
from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager

_paused = False  # True inside ``running`` until the command's modules are imported


@contextmanager
def running() -> Iterator[None]:
    """The whole life of an ``mm`` command: the collector paused until ``imported``, the heap frozen at exit."""
    global _paused
    was_enabled = _paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        _paused = False
        gc.freeze()  # before the interpreter's finalisation, which would otherwise collect the whole heap
        if was_enabled:  # a collector its caller had turned off stays off
            gc.enable()


def imported(*modules: str) -> None:
    """Import ``modules`` (the command's), then, if ``running`` paused the collector, freeze what the imports built
    and turn the collector back on for the work."""
    global _paused
    for name in modules:
        importlib.import_module(name)
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
