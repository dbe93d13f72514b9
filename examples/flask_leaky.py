#!/usr/bin/python3
"""A Flask app with a memory problem, for docs/profile.md.

GET /report/<id> renders a report and remembers it "for later" in a module-
level dict that nothing ever empties. Run as a script, it serves 3,000
requests through Flask's test client (no network) and exits:

    ebb profile -o /tmp/flask -- /usr/bin/python3 examples/flask_leaky.py
    ebb profile report /tmp/flask.*.ebbprof --at end
"""
import json

from flask import Flask

app = Flask(__name__)
_rendered = {}  # report id -> body: grows forever


def load_rows(report_id):
    return [{"id": report_id * 1000 + i, "name": f"row {i}", "values": list(range(20))} for i in range(100)]


def render(report_id):
    rows = load_rows(report_id)
    body = json.dumps({"report": report_id, "rows": rows})
    _rendered[report_id] = body  # the leak: kept after the response is sent
    return body


@app.route("/report/<int:report_id>")
def report(report_id):
    return app.response_class(render(report_id), mimetype="application/json")


if __name__ == "__main__":
    client = app.test_client()
    for n in range(3000):
        assert client.get(f"/report/{n}").status_code == 200
    print(f"served 3000 requests; {len(_rendered)} reports kept")
