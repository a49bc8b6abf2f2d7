"""SIGTERM and SIGINT end the live runs properly, then do what they would have done without us.

SLURM, Kubernetes and `timeout` stop a job with SIGTERM, whose default action kills the process at
once: buffered steps were lost and the run stayed `running`. start_run, when called in the main thread
(Python runs signal handlers only there), installs a handler for each signal that is not ignored. Where the
signal's action was the default (SIGTERM), the handler finishes every live run as `failed` with the
signal's name in `status_reason`, restores the default and re-sends the signal, so the process ends as
it would have (exit status 143). Where a Python handler was there before (SIGINT's, which raises
KeyboardInterrupt, or the program's own), the program goes on after it: the handler flushes every live
run, marks it to end as `failed` with the signal's name whenever it ends, and calls the previous one.
Either way, code that holds rows for a run before logging them (an integration's block of steps
waiting for its online B_simple) is asked to log them first (Run.add_flusher). A signal that arrives
while a run is finishing, or while a logging call moves rows between buffers (Run._seal, or such code
inside `deferred()`), waits for it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import weakref

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_live: weakref.WeakSet = weakref.WeakSet()  # runs not finished yet
_finishing: set = set()  # tokens of blocks signals wait for: id() of runs inside finish(), deferred() blocks
_previous: dict[int, object] = {}  # signal -> the handler we replaced
_deferred: list[int] = []  # signals that arrived during a finish


def watch(run) -> None:
    """Track a new run; install the handlers once, from the main thread only."""
    _live.add(run)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        if sig in _previous:
            continue
        prev = signal.getsignal(sig)
        if prev in (signal.SIG_IGN, None):  # ignored on purpose (nohup), or set outside Python: leave it
            continue
        _previous[sig] = prev
        signal.signal(sig, _on_signal)


def forget(run) -> None:
    _live.discard(run)


def finishing(run, inside: bool) -> None:
    """Mark a run's finish() as running (a signal now waits for it) or done (then a waiting one acts)."""
    if inside:
        _finishing.add(id(run))
        return
    _finishing.discard(id(run))
    _act_on_deferred()


class deferred:  # noqa: N801 - used as a function: `with signals.deferred():`
    """A block that a signal handler must not interrupt (it moves rows from one buffer to another, and a
    handler's flush in between would miss them): a signal arriving meanwhile acts when the block ends.
    A class, not a generator context manager: the trainer enters one every step (~0.5 us, not ~1.7)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _finishing.add(id(self))  # unique while the block holds it

    def __exit__(self, *exc) -> None:
        _finishing.discard(id(self))
        _act_on_deferred()


def _act_on_deferred() -> None:
    if _finishing or not _deferred:
        return
    if threading.current_thread() is threading.main_thread():
        _on_signal(_deferred.pop(), None)
    else:  # handlers run (and may only be set) in the main thread: send it there again
        os.kill(os.getpid(), _deferred.pop())


def _on_signal(signum: int, frame) -> None:
    if _finishing:  # we interrupted a finish(): let it complete, then act (see finishing())
        if signum not in _deferred:
            _deferred.append(signum)
        return
    name = signal.Signals(signum).name
    runs = [r for r in list(_live) if r._status is None]
    for run in runs:  # rows that code above the run still holds (Run.add_flusher): log them first
        run.flush_held()
    prev = _previous.get(signum, signal.SIG_DFL)
    if callable(prev):
        # The program goes on: KeyboardInterrupt may be caught, a handler of the program's own may stop
        # its loop gracefully and log a last evaluation. So flush now, and end the runs whenever they
        # end (the with-block, finish(), exit) as failed with this signal's name.
        for run in runs:
            print(f"batchscope: {name}: run {run.run_id} flushed; it will end as failed ({name})",
                  file=sys.stderr, flush=True)
            run.stopped_by(name)
        prev(signum, frame)  # e.g. signal.default_int_handler raises KeyboardInterrupt
        return
    for run in runs:  # the default action kills the process right after: end the runs now
        print(f"batchscope: {name}: ending run {run.run_id} as failed, with every step it logged",
              file=sys.stderr, flush=True)
        run.finish("failed", reason=name)
    signal.signal(signum, signal.SIG_DFL)  # die of the signal, as we would have without the handler
    os.kill(os.getpid(), signum)
