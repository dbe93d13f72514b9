"""RQ workers that stop between jobs, never in the middle of a dequeue.

`ebb run` recycles a worker with SIGTERM. RQ (1.13, Debian 12) handles it
as a warm shutdown, except when the worker is not busy: then its handler
raises StopRequested wherever the worker is. Between the moment Redis hands
a job out (LPOP/BLPOP) and the moment the worker marks itself busy there is
a window where that exception drops the job on the floor: it has left the
queue and is in no registry. Under a fleet that is recycled often, some
jobs are lost.

These workers make SIGTERM/SIGINT only ask to stop. The dequeue loop looks
at the request before each wait for a job (waiting at most a second, so an
idle worker stops within about a second), and a job that was taken is
always run to the end first. A second signal is still RQ's cold shutdown.

    rq worker --worker-class ebb.rq.SimpleWorker ...   # jobs run in the worker
    rq worker --worker-class ebb.rq.Worker ...         # a forked horse per job
"""
import rq.worker

import ebb.imports
from rq.exceptions import DequeueTimeout
from rq.worker import StopRequested, WorkerStatus

# How long one wait for a job may block: the longest an idle worker takes to
# notice it was asked to stop.
POLL_SECONDS = 1


class StopBetweenJobs:
    """Mixin for rq.Worker classes: warm shutdown only between jobs."""

    def _shutdown(self):
        # RQ raises StopRequested here when the worker is idle; we only ask.
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()

    def dequeue_job_and_maintain_ttl(self, timeout, *args, **kwargs):
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        while True:
            if self._stop_requested:
                raise StopRequested()  # safe: nothing has been taken from Redis
            self.heartbeat()
            # None is burst mode's "do not block"; otherwise block briefly.
            wait = None if timeout is None else max(1, min(POLL_SECONDS, int(timeout)))
            try:
                result = self.queue_class.dequeue_any(self._ordered_queues, wait, connection=self.connection,
                                                      job_class=self.job_class, serializer=self.serializer)
            except DequeueTimeout:
                continue
            if result is None:  # burst mode: the queues are empty
                return None
            job, queue = result
            self.log.info("%s: %s", queue.name, job.id)
            self.heartbeat()
            return result


class Worker(StopBetweenJobs, rq.worker.Worker):
    """rq.Worker (a forked work horse per job) that stops between jobs."""


class SimpleWorker(StopBetweenJobs, rq.worker.SimpleWorker):
    """rq.SimpleWorker (jobs run in the worker) that stops between jobs."""

    def perform_job(self, job, queue):
        try:
            return super().perform_job(job, queue)
        finally:
            ebb.imports.task_done()  # `ebb imports --tasks N`: the report after the Nth job
