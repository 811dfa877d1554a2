"""SIGINT and SIGTERM stop a command within seconds, wherever it is.

A Python signal handler runs only when the main thread returns to Python; code blocked in native
calls (a Ray connection, a collective in a C++ loop) can hold it off for minutes. So the handler
raises :class:`Interrupted` in the main thread, which lets the command clean up (Ray Data stops its
operators, the local Ray shuts down), and a watcher thread, woken through
:func:`signal.set_wakeup_fd` even while the main thread is blocked, ends the process ``grace``
seconds later, or at once on a second signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a ``KeyboardInterrupt`` so that libraries clean up as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals(message: str, grace: float = 10.0) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise :class:`Interrupted`; if the process is still running
    ``grace`` seconds after the first one, or a second one comes, ``message`` is printed and it exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for signum in SIGNALS:
        signal.signal(signum, _raise)
    wanted = {int(signum) for signum in SIGNALS}

    def watch() -> None:
        first, deadline = 0, 0.0
        while True:
            signum = _read_signal(read_end, timeout=max(0.0, deadline - time.monotonic()) if first else None)
            if signum is None:  # the block ended without a signal
                return
            if signum != -1 and signum not in wanted:
                continue
            if not first:
                first, deadline = signum, time.monotonic() + grace
                continue
            # still running `grace` seconds after the first signal (-1), or a second signal
            sys.stderr.write(f"\n{message}\n")
            sys.stderr.flush()
            os._exit(128 + first)

    threading.Thread(target=watch, name="stop-on-signals", daemon=True).start()
    interrupted = False
    try:
        yield
    except Interrupted:
        interrupted = True  # the watcher keeps counting while the caller cleans up
        raise
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        if not interrupted:
            os.close(write_end)


def _read_signal(fd: int, timeout: float | None) -> int | None:
    """The next signal number written to ``fd``; -1 when ``timeout`` passed, None once it is closed."""
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return -1
    data = os.read(fd, 1)
    if not data:
        os.close(fd)
        return None
    return data[0]
