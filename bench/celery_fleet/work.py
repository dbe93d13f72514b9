"""The body of bench/celery_fleet's task, without Celery or Redis: what
app.py's `job` and bench/speed/celery_task_mix.py both run."""


def build_result(doc):
    """Walks a document (rows, a tree, a blob) and builds a result from it."""
    result = {}
    for row in doc.get("rows", ()):
        result[row[:12]] = row.upper()
    for k, v in doc.get("tree", {}).items():
        result[k] = [x * 2 for x in v["v"]] + [v["s"][::-1]]
    if "blob" in doc:
        result["blob"] = doc["blob"].replace("b", "c")
    return result
