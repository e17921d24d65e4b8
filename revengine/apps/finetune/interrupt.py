"""Ctrl-C during a run: the first finishes the step and saves a checkpoint, the second aborts."""
from __future__ import annotations

import contextlib
import signal
import sys


class Interrupt:
    """First Ctrl-C: finish the step, save, exit. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.requested = True
            print("\nrevengine finetune: interrupted; finishing this step and saving a checkpoint "
                  "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._prev = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False
