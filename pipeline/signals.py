"""SIGTERM and SIGUSR1 handled like Ctrl-C: SLURM's preemption and time limit stop a job cleanly.

SLURM (and Kubernetes, and `kill`) end a job with SIGTERM, whose default action kills Python at
once: no `finally` runs, so stage 1 left its store lock behind and stage 2 wrote nothing to
run.log. Under `stop_signals()` SIGTERM raises `Interrupted`, a `KeyboardInterrupt`, so every
path that already survives Ctrl-C (locks released in `finally`, atomic writes, the CLI's one
line) survives SIGTERM too.

Two ways to stop:
- at once (`stop_signals()`): the signal raises where the program is. Stages 2 and 3 do this;
  their state is the last checkpoint, written atomically.
- at a boundary (`stop_signals(deferred=True)`): the first signal only sets a flag that a loop
  reads with `requested()` at a safe point and answers with `raise interrupted()`; a second
  signal raises at once. Stage 1 stops at the next batch boundary this way, its finished shards
  written and marked; stage 2 at the next logging step on which every rank agrees, after
  writing a checkpoint of that step. SIGUSR1 (what `sbatch --signal=USR1@120` sends before a
  time limit) is handled too, in deferred blocks only.

Exit status: a job that stopped at a safe point with its state written exits `REQUEUE_EXIT` (75,
sysexits' EX_TEMPFAIL: "try again later"), which an sbatch script turns into `scontrol requeue`;
a job stopped at once exits 128 + the signal's number, as a shell reports a killed command.

Forked children never keep these handlers (`os.register_at_fork`): a multiprocessing pool stops
its workers with SIGTERM (`Pool.terminate`, which `with Pool()` calls), and a worker that had
inherited the deferred handler would note the signal and wait on, and the pool's join would hang
(it did: the manifest scan inside stage 1). A child starts with the default handlers; DataLoader
workers then ignore both signals through `ignore_in_worker` (a `worker_init_fn`), so a signal
sent to the whole process group (as SLURM does) leaves the stopping to the main process, which
then shuts its workers down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFERRED_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR1)
REQUEUE_EXIT = 75                   # stopped at a safe point, state written: run again (sbatch: requeue)
_state = {"pending": None}          # the signal number a deferred handler has seen, if any


class Interrupted(KeyboardInterrupt):
    """The job was asked to stop by `signum`. `saved`: it stopped at a safe point with its state
    written (exit status `REQUEUE_EXIT`); otherwise where it was (the shell's 128 + signum)."""

    def __init__(self, signum: int, saved: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.saved = saved
        self.exit_code = REQUEUE_EXIT if saved else 128 + signum


def requested() -> int | None:
    """The signal a deferred handler has received (None if none): stop at the next safe point."""
    return _state["pending"]


def agree(signum: int) -> None:
    """The ranks agreed to stop for `signum` (another rank's signal, if this one got none): `interrupted()`
    then names it."""
    if _state["pending"] is None:
        _state["pending"] = signum


def interrupted() -> Interrupted:
    """The exception to raise at a safe point after `requested()`, the state written."""
    return Interrupted(_state["pending"] or signal.SIGINT, saved=True)


@contextlib.contextmanager
def stop_signals(deferred: bool = False) -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise `Interrupted` (at once, or at the loop's next
    `requested()` check when `deferred`, a second signal then raising at once; a deferred block also
    takes SIGUSR1). Restores the previous handlers on exit. Outside the main thread (signal handlers
    cannot be set there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if deferred and _state["pending"] is None:
            _state["pending"] = signum
            return
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (DEFERRED_SIGNALS if deferred else STOP_SIGNALS)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state["pending"] = None


def _defaults_in_child() -> None:
    """After a fork: a child never runs this module's handlers (see the module docstring)."""
    ours = [s for s in DEFERRED_SIGNALS
            if getattr(signal.getsignal(s), "__qualname__", "").startswith("stop_signals.")]
    for s in ours:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    _state["pending"] = None


os.register_at_fork(after_in_child=_defaults_in_child)


def ignore_in_worker(worker_id: int | None = None) -> None:
    """In a DataLoader worker: ignore SIGINT/SIGTERM/SIGUSR1 (the main process stops the workers), and stay
    quiet when a main process stopped at once (stage 3) hangs up while fetching a batch's shared memory:
    the worker's `multiprocessing.resource_sharer` thread would print that broken connection as a
    traceback, although the batch was only being dropped."""
    import sys

    for s in DEFERRED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    sys.excepthook = _quiet_hangup(sys.excepthook)


def _quiet_hangup(hook):
    def excepthook(kind, value, tb):
        frames, at = [], tb
        while at is not None:
            frames.append(at.tb_frame.f_code.co_filename)
            at = at.tb_next
        if issubclass(kind, (EOFError, ConnectionError)) and any(f.endswith("resource_sharer.py") for f in frames):
            return
        hook(kind, value, tb)
    return excepthook
