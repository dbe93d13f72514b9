"""A Flask app that reports its worker's garbage-collector state (ebb.gunicorn tests)."""
import gc
import os

from flask import Flask, jsonify

app = Flask(__name__)
LOADED = [{"n": i, "s": str(i) * 5} for i in range(50_000)]  # something to freeze


@app.route("/")
def state():
    return jsonify(pid=os.getpid(), enabled=gc.isenabled(), frozen=gc.get_freeze_count())
