"""gunicorn's gthread worker, stopped without dropping a keep-alive request.

A gthread worker (`--worker-class gthread`, or any `--threads` above 1)
keeps idle keep-alive connections in its event loop. On a graceful stop
(SIGTERM from its master or from `ebb run --children`, or --max-requests)
gunicorn 20.1 leaves that loop and exits without serving them, and closes
a connection whose answer promised keep-alive just before the stop began:
the client's next request on it is never read and it sees the connection
reset. Measured under wrk (4
connections, 10 s) with 2 leaking workers recycled by ebb at 45 MB: 68 read
errors in 10,703 requests (tests/integration/test_children.py runs the
same with this worker: none). gunicorn's own issue #3038 reports it for
--max-requests.

This worker, on a graceful stop, stops accepting (other workers take the
new connections), then goes on serving what clients send on the
connections it holds, each answer with `Connection: close`, until none is
left open or --graceful-timeout has passed. A connection that stays idle is
closed at its keep-alive timeout, as it would be at any other time.

    gunicorn --worker-class ebb.gthread.ThreadWorker --threads 4 app:app
"""
import time
from concurrent import futures

from gunicorn.workers import gthread

__all__ = ["ThreadWorker"]


class ThreadWorker(gthread.ThreadWorker):
    """gthread, with a drain of its keep-alive connections on graceful stop."""

    def run(self):
        for sock in self.sockets:
            sock.setblocking(False)
            # the listener's name, taken now: it may be gone by the time a request needs it
            self.poller.register(sock, gthread.selectors.EVENT_READ,
                                 gthread.partial(self.accept, sock.getsockname()))
        while self.alive and self._step(accepting=True):
            pass
        self._drain()

    def _step(self, accepting):
        """One turn of the event loop; False when the master is gone."""
        self.notify()
        if not accepting or self.nr_conns < self.worker_connections:
            for key, _ in self.poller.select(1.0 if accepting else 0.1):
                key.data(key.fileobj)
            wait = 0
        else:
            wait = 1.0  # every connection is taken: wait for a request to finish
        done = futures.wait(self.futures, timeout=wait, return_when=futures.FIRST_COMPLETED).done
        for fut in done:
            self.futures.remove(fut)
        self.murder_keepalived()  # idle keep-alive connections past their timeout
        return self.is_parent_alive()

    def _drain(self):
        # Graceful stop: no new connections; serve the requests that come on
        # the open ones (gunicorn answers them with Connection: close while
        # self.alive is False, and closes them), until none is left. Counted
        # by nr_conns: a request's future is done before its callback
        # (finish_request, in the pool's thread) has put the connection
        # back in the keep-alive set, so an empty set proves nothing.
        for sock in self.sockets:
            self.poller.unregister(sock)
            sock.close()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while (self.nr_conns > 0 or self.futures or self._keep) and time.monotonic() < deadline:
            if not self._step(accepting=False):
                break
        with self._lock:
            self._drained = True  # finish_request closes what comes after this
            self.tpool.shutdown(False)
            self.poller.close()

    _drained = False

    def finish_request(self, fs):
        # gunicorn closes a connection once self.alive is False, even when
        # the answer it just sent promised keep-alive (decided before the
        # stop began): the client's next request on it then meets a closed
        # socket. Measured: every one of the errors left after the drain
        # was such a connection. While draining, keep it, so that request
        # is answered (with Connection: close).
        if self.alive or fs.cancelled() or fs.exception() is not None:
            return super().finish_request(fs)
        keepalive, conn = fs.result()
        with self._lock:
            if keepalive and not self._drained:
                conn.sock.setblocking(False)
                conn.set_timeout()
                self._keep.append(conn)
                self.poller.register(conn.sock, gthread.selectors.EVENT_READ,
                                     gthread.partial(self.reuse_connection, conn))
                return None
        return super().finish_request(fs)
