"""Ctrl-C and SIGTERM end a job's driver at once, even while its main thread waits inside C code.

Python runs signal handlers (Ray's own included) in the main thread between bytecodes, so a driver
whose `ray.init` waits inside Ray's C++ code for a cluster that does not answer ignored SIGTERM until
that call gave up (measured: still running 30 s after SIGTERM). Here the signals are blocked in every
thread and one thread waits for them. Standard library only: the job scripts call it before importing
anything that starts a thread (a thread started earlier would take the signal the old way).
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def exit_promptly_on_signals() -> None:
    """Ctrl-C and SIGTERM end this process at once (exit status 128 + signal), whatever the main thread is doing.

    Call it first thing in a driver's main thread, before other threads start: they inherit the block.
    Rows already written stay written; `--resume` continues the run.
    """
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)

    def wait_for_a_stop() -> None:
        received = signal.sigwait(stops)
        print(f"\nstopped by {signal.Signals(received).name}; rows written so far stay written (--resume "
              "continues the run)", file=sys.stderr, flush=True)
        os._exit(128 + received)

    threading.Thread(target=wait_for_a_stop, name="stop-on-signal", daemon=True).start()
