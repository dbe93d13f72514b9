"""A Flask app that leaks about 300 KB per request (for ebb run --children)."""
import os

from flask import Flask

app = Flask(__name__)
leak = []


@app.route("/")
def index():
    leak.append(b"x" * 300_000 + os.urandom(8))
    return f"{os.getpid()} {len(leak)}\n"
