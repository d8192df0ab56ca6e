"""Ctrl-C that stops a run between steps, never inside one.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens to
be. In a JAX run that is often inside a callback from XLA's native code (Python then ignores the
exception and the run goes on) or while XLA's threads are still computing (the process then died
with SIGSEGV on its way out). Under `deferred`, which the CLI wraps around every command, the first
Ctrl-C only records the request; the long loops (statistics batches, training steps, generation
and evaluation batches, per-layer solves) call `check` at their step boundaries, which waits for
the step in flight, lets the loop save its progress, and raises `Interrupted`. A second Ctrl-C
restores Python's handler and stops at once, as before.

Library callers that never enter `deferred` keep Python's usual behaviour: `check` is then a
no-op."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_requested = threading.Event()
_active = False


class Interrupted(KeyboardInterrupt):
    """Raised by `check` at a step boundary after Ctrl-C; ``str()`` says where progress was saved."""


@contextlib.contextmanager
def deferred(announce: Callable[[str], None] | None = None) -> Iterator[None]:
    """Within this block, the first SIGINT requests a stop at the next `check`; the second raises
    ``KeyboardInterrupt`` at once. ``announce(message)`` is told of the first (default: stderr).
    Outside the main thread (where signal handlers cannot be set) this does nothing."""
    global _active
    if threading.current_thread() is not threading.main_thread() or _active:
        yield
        return
    say = announce or (lambda m: print(m, file=sys.stderr, flush=True))
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if _requested.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _requested.set()
        say("\nhcnr: stopping after the current step (Ctrl-C again to stop at once)")

    _requested.clear()
    signal.signal(signal.SIGINT, handler)
    _active = True
    try:
        yield
    finally:
        _active = False
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def requested() -> bool:
    """True once a deferred Ctrl-C is waiting for the next `check`."""
    return _requested.is_set()


def check(wait_for: Any = None, save: Callable[[], str | None] | None = None, where: str = "") -> None:
    """Raise `Interrupted` if Ctrl-C was pressed under `deferred`; otherwise return at once.

    ``wait_for``: arrays still being computed, waited for first (so no XLA work outlives the run).
    ``save()``: keeps the progress made so far and returns a note of where (``"progress saved in
    DIR; rerun the same command to resume"``), made part of the message. ``where``: the step reached."""
    if not _requested.is_set():
        return
    if wait_for is not None:
        import jax

        jax.block_until_ready(wait_for)
    note = save() if save is not None else None
    raise Interrupted("; ".join(x for x in (where, note) if x))
