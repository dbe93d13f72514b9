"""Small Flask app for the gunicorn integration test; every response is deterministic."""
import os

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.after_request
def tag_worker(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.get("/")
def index():
    return "ok\n"


@app.get("/json")
def items():
    """n dicts, each with a nested list: lots of small allocations."""
    n = request.args.get("n", 3000, type=int)
    return jsonify([{"id": i, "name": f"item-{i}", "squares": [i * i, i * i * i]}
                    for i in range(n)])


@app.get("/blob")
def blob():
    """size bytes of the 256-byte pattern (seed, seed+1, ...) mod 256, repeated."""
    size = request.args.get("size", 1 << 20, type=int)
    seed = request.args.get("seed", 0, type=int)
    pattern = bytes((seed + i) % 256 for i in range(256))
    return Response((pattern * (size // 256 + 1))[:size], mimetype="application/octet-stream")


@app.post("/echo")
def echo():
    """The request body, reversed."""
    return Response(request.get_data()[::-1], mimetype="application/octet-stream")
