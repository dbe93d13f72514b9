"""Celery workers that stop between tasks when ebb recycles them.

`ebb run` recycles a worker with SIGTERM, which Celery treats as a warm
shutdown: finish the current task, then exit. But Celery 5.2 (Debian 12)
implements that with a flag only when the worker has more than one thread;
with one (`--pool=solo` without gossip, mingle and heartbeat) its handler
raises WorkerShutdown from inside the signal handler, wherever the worker
is (celery/apps/worker.py, `_shutdown_handler`). Landing:

- inside a task after its side effects but before its late ack: the
  message is restored at shutdown and the task runs twice;
- inside kombu's Redis delivery, after BRPOP took the message and before
  the MULTI/ZADD/HSET/EXEC that records it as unacknowledged has finished:
  the message is in neither the queue nor the unacked set, and is lost
  (or stuck for the visibility timeout, an hour by default).

Plain `kill -TERM` reproduces both; ebb's tests measured lost or doubled
tasks in 7 of 9 runs of 400 tasks. This module adds a consumer step whose
SIGTERM/SIGINT handler only sets Celery's own stop flag, which the consumer
loop checks between two iterations, after the current task has finished
and been acknowledged. With it the same test ran every task exactly once in
10 of 10 runs.

Use it either way:

    python3 -m ebb.celery -A proj worker --pool=solo ...   # the celery CLI, with the step added
    ebb.celery.install(app)                                # in the app module

A second signal is still a stop request (use SIGQUIT for Celery's cold
shutdown); ebb run sends SIGKILL after its grace.

Celery's prefork pool (`ebb run --children -- python3 -m ebb.celery ...
--pool prefork`): ebb recycles one pool process at a time, and billiard's
pool processes exit at once, mid-task, on SIGTERM (billiard/common.py,
`reset_signals`), so the task is lost (or, with acks_late, dropped or run
twice). Under ebb (EBB_WORKER_ID set), this module also teaches every pool
process a graceful stop: on RECYCLE_SIGNAL (SIGINT, which billiard's pool
processes otherwise ignore) it finishes the task it runs, hands its result
to the master and exits the way `--max-tasks-per-child` makes it exit
(EX_RECYCLE); the master forks its replacement. `ebb run` sends that signal
by itself when it recognises `python3 -m ebb.celery` as the master.
SIGTERM keeps billiard's meaning (revoke with terminate, cold shutdown).

The master's own restart (`ebb run --children --master-hard-limit`): on
DRAIN_SIGNAL (SIGUSR2) the master stops consuming, runs every task it has
already taken from the broker (prefetched ones included), and only then
shuts down warmly, while ebb has started its successor. A plain warm
shutdown of a busy prefork master can hang: it stops the event loop that
writes a job to a pool process in pieces, and the pool process then waits
for the rest of the job while the master waits for it (docs/run.md). With
nothing left to write, there is nothing to hang on. SIGUSR2 is Celery's
remote-debugger signal only when CELERY_RDBSIG is set.

For Celery's own prefork pool (teams not running `ebb run --preload`),
`ebb.celery.freeze_before_fork()` keeps the app's memory shared between the
pool's processes: call it at the top of the app module (see its docstring).
"""
import gc
import os
import signal
import sys
import time

from celery import bootsteps, signals
from celery.worker import state

import ebb.imports

__all__ = ["DRAIN_SIGNAL", "RECYCLE_SIGNAL", "freeze_before_fork", "install", "StopBetweenTasks"]

# What `ebb run --children` sends a prefork pool process it recycles.
RECYCLE_SIGNAL = signal.SIGINT
# What it sends the master it restarts above --master-hard-limit.
DRAIN_SIGNAL = signal.SIGUSR2
DRAIN_POLL_S = 0.2  # how often the event loop looks at the drain

_drain = {"asked": False, "since": None}


def _stop_asked():
    # Celery's test (state.maybe_shutdown): 0 is a request (exit status 0), False is not.
    return state.should_stop is not None and state.should_stop is not False


def _request_stop(signum, frame):
    # Celery's own warm-shutdown flag (its multi-threaded path sets the same);
    # state.maybe_shutdown() raises WorkerShutdown from the consumer loop.
    if _drain["asked"]:
        # Draining already ends in a warm shutdown; stopping now would stop
        # the event loop with a job half written (SIGTERM from systemd, or
        # the stop-if-ebb-dies signal). SIGQUIT is still the cold shutdown.
        os.write(2, b"worker: ebb.celery: draining; the warm shutdown follows it\n")
        return
    if not _stop_asked():
        os.write(2, b"worker: Warm shutdown (ebb.celery: after the current task)\n")
    state.should_stop = 0  # exit status 0


def _request_drain(signum, frame):
    # Only a flag: the event loop's timer does the work (_drain_tick), out of
    # any kombu or billiard code the signal may have interrupted.
    _drain["asked"] = True


def _drain_tick(c):
    if not _drain["asked"] or _stop_asked():
        return
    consumer = getattr(c, "task_consumer", None)
    if consumer is not None:
        # Each tick: a consumer Celery restarted (lost connection) consumes again.
        # A message a BRPOP already took is put back by kombu: no consumer is left for it.
        consumer.cancel()
    if _drain["since"] is None:
        _drain["since"] = time.monotonic()
        os.write(2, f"worker: ebb.celery: master {os.getpid()} draining (no new task; "
                 f"{len(state.reserved_requests)} taken still to run), then warm shutdown\n".encode())
        return
    if state.reserved_requests or state.active_requests:
        return  # what the master took runs first: nothing is half written to a pool process at shutdown
    os.write(2, f"worker: ebb.celery: drained in {time.monotonic() - _drain['since']:.1f}s; "
             "warm shutdown\n".encode())
    state.should_stop = 0


class StopBetweenTasks(bootsteps.StartStopStep):
    """Consumer step: installs the handlers once Celery has installed its own."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.tick = None

    def start(self, c):
        try:
            signal.signal(signal.SIGTERM, _request_stop)
            signal.signal(signal.SIGINT, _request_stop)
            signal.signal(DRAIN_SIGNAL, _request_drain)
        except ValueError:  # not the main thread: keep Celery's handlers
            return
        if self.tick is None and getattr(c, "timer", None) is not None:
            # The consumer's timer is the event loop's (kombu's hub), with prefork and solo alike
            # on Redis; the tick runs between two iterations of the loop.
            self.tick = c.timer.call_repeatedly(DRAIN_POLL_S, _drain_tick, (c,))

    def stop(self, c):
        if self.tick is not None:
            self.tick.cancel()
            self.tick = None
        # Stop consuming. If a BRPOP is still waiting for its reply on the
        # Redis channel, read it now: with no consumer left, kombu puts the
        # message back instead of dropping it with the connection. (kombu
        # internals, used only when present.)
        consumer = getattr(c, "task_consumer", None)
        if consumer is None:
            return
        try:
            consumer.cancel()
        except Exception:  # noqa: BLE001 - the connection may already be gone
            return
        channel = getattr(consumer, "channel", None)
        if channel is not None and getattr(channel, "_in_poll", None) and hasattr(channel, "_brpop_read"):
            try:
                channel._brpop_read()
            except Exception:  # noqa: BLE001 - nothing was waiting (Empty) or the connection is gone
                pass

    shutdown = stop


def install(app):
    """Adds the step to a Celery app, and, under ebb, the graceful stop to
    its prefork pool processes (idempotent); returns the app."""
    steps = app.steps["consumer"]
    if StopBetweenTasks not in steps:
        steps.add(StopBetweenTasks)
    if os.environ.get("EBB_WORKER_ID"):
        recycle_pool_processes_between_tasks()
    return app


def recycle_pool_processes_between_tasks():
    """Makes RECYCLE_SIGNAL stop a billiard pool process between two tasks.

    Patches billiard's pool process class in the master, before it forks:
    each pool process, once billiard has set up its own signal handlers,
    installs a handler that only records the request, and wraps the
    function its loop calls to wait for the next job. That function is
    where billiard's own loop stands between two tasks (the result of the
    previous one is sent; no new one is taken), so exiting there is exactly
    what --max-tasks-per-child does. An idle process leaves within a second
    (billiard polls for jobs once a second); a job the master wrote to it
    and it never read is given to another process by the master
    (celery/concurrency/asynpool.py, on_partial_read), as for any recycle.
    Idempotent."""
    from billiard import pool

    if getattr(pool.Worker, "_ebb_recycle", False):
        return
    after_fork = pool.Worker.after_fork

    def after_fork_then_arm(self):
        after_fork(self)  # billiard's: resets the signals, ignores SIGINT
        _arm(self)

    pool.Worker.after_fork = after_fork_then_arm
    pool.Worker._ebb_recycle = True


def _arm(worker):
    from billiard.pool import EX_RECYCLE

    asked = []

    def on_signal(signum, frame):
        if not asked:
            os.write(2, f"ebb.celery: pool process {os.getpid()} recycles after its current task\n".encode())
        asked.append(signum)

    signal.signal(RECYCLE_SIGNAL, on_signal)
    wait_for_job = worker.wait_for_job

    def wait_for_job_unless_asked():
        if asked:
            sys.exit(EX_RECYCLE)  # billiard's sys.exit: its loop's finally blocks run, the master is told
        return wait_for_job()

    worker.wait_for_job = wait_for_job_unless_asked


@signals.task_postrun.connect(weak=False, dispatch_uid="ebb.celery.imports")
def _task_done(**kwargs):
    ebb.imports.task_done()  # `ebb imports --tasks N`: the report after the Nth task (solo and threads pools)


@signals.celeryd_init.connect
def _install_in_worker(sender=None, instance=None, **kwargs):
    # `python -m ebb.celery`: add the step to whatever app the worker runs.
    if os.environ.get("EBB_CELERY_STEP") == "1" and instance is not None:
        install(instance.app)


def freeze_before_fork():
    """Keep what the prefork pool's parent loaded shared with its children.

    The pool forks its children from the parent, which has imported the app;
    they share its memory copy-on-write until their garbage collector writes
    to the header of every object it visits. gc.freeze() moves everything
    loaded so far to a generation the collector never visits (CPython's
    gc.freeze documentation; seed 004 measured 31% less fleet PSS with it
    under gunicorn). This connects a `worker_init` handler that, in the
    worker's parent process and before the pool forks, collects once and
    freezes. Call it in the app module:

        import ebb.celery
        ebb.celery.freeze_before_fork()
        app = Celery(...)

    It changes nothing in other processes that import the app (a web server
    calling `task.delay`, celery beat): only a worker sends `worker_init`.
    Pool processes started later (`--max-tasks-per-child`) inherit the same
    frozen heap; what the parent allocated since is not frozen, so no
    garbage is ever pinned. Idempotent. Under `ebb run --preload` it is not
    needed: the fork server does the same.
    """
    signals.worker_init.connect(_freeze_in_parent, weak=False, dispatch_uid="ebb.celery.freeze")


def _freeze_in_parent(**kwargs):
    # The app and its imports are loaded; the pool has not forked yet.
    gc.collect()  # what is garbage now would otherwise be frozen with the rest
    gc.freeze()


def main():
    import sys

    from celery.__main__ import main as celery_main
    # From the start: a drain asked before the consumer runs is kept for it
    # (SIGUSR2's default action would kill the master). Pool processes reset it.
    signal.signal(DRAIN_SIGNAL, _request_drain)
    os.environ["EBB_CELERY_STEP"] = "1"
    sys.argv[0] = "celery"
    return celery_main()


if __name__ == "__main__":
    raise SystemExit(main())
