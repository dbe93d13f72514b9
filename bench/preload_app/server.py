"""One worker of the benchmark fleet: a single-threaded WSGI server (like a
gunicorn sync worker) on a port shared with its siblings (SO_REUSEPORT; the
kernel spreads the connections). Usage: server.py PORT"""
import socket
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from app import app


class Server(WSGIServer):
    request_queue_size = 128

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


make_server("127.0.0.1", int(sys.argv[1]), app, server_class=Server, handler_class=QuietHandler).serve_forever()
