"""What each import costs: the import tree with the memory every module keeps.

    python3 -m ebb.imports [--json] [--min SIZE] [--then CODE] MODULE...
    ebb imports [--json] [--min SIZE] [--usage] [--for DURATION] [--tasks N] -- COMMAND...

The first form imports the modules in a fresh interpreter (this one's), the
second runs any Python command; both print the tree of the imports with, per
module, the bytes still live after it was imported (its own, and with what it
imported first), the bytes it allocated, its objects and its time, and who
imported it. With libebb loaded the figures are libebb's counters (exact,
at size-class granularity); without it, tracemalloc's (the report says which).
With --then CODE (or --usage), modules none of whose functions ran are listed
as candidates for a lazy import, with the bytes that would save at start.

The measuring is done inside the measured process by
ebb/_imports_boot/sitecustomize.py; this file renders its data (text()) and
is the command line of the first form (main()). docs/imports.md has more.
"""
import json
import os
import sys

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """'64K', '1.5M', '2GiB', '1000' -> bytes (as `ebb` parses sizes); ValueError if bad."""
    t = text.strip().lower()
    for suffix in ("ib", "b"):
        if len(t) > len(suffix) and t.endswith(suffix) and not t[:-len(suffix)][-1:].isdigit():
            t = t[:-len(suffix)]
            break
    unit = t[-1:] if t[-1:].isalpha() else ""
    value = float(t[:len(t) - len(unit)])
    if unit not in _UNITS or value < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(value * _UNITS[unit])


def human(n):
    """Bytes as `ebb` prints them: 1536 -> '1.5K' (binary units); signed."""
    if n is None:
        return "-"
    sign, v = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "K", "M", "G", "T"):
        if v < 1024 or unit == "T":
            return f"{sign}{v}B" if unit == "B" else f"{sign}{v:.1f}{unit}"
        v /= 1024
    return None  # not reached


# ---- the tree ---------------------------------------------------------------

_FIELDS = ("live", "self_live", "allocated", "self_allocated", "objects", "self_objects")


def build(data):
    """The report as a dict (what --json prints): the tree, sorted by live bytes."""
    records = data["records"]
    nodes = []
    for r in records:
        node = {"name": r["name"], "kind": r.get("kind"), "imported_by": None, "at": r.get("at")}
        for f in _FIELDS:
            node[f] = r.get(f)
        node["ms"] = round(r.get("ns", 0) / 1e6, 3)
        node["self_ms"] = round(r.get("self_ns", 0) / 1e6, 3)
        if r.get("thread") is not None:
            node["thread"] = r["thread"]
        if "error" in r:
            node["error"] = r["error"]
        node["children"] = []
        nodes.append(node)
    roots = []
    for r, node in zip(records, nodes):
        if r["parent"] is None:
            roots.append(node)
        else:
            node["imported_by"] = records[r["parent"]]["name"]
            nodes[r["parent"]]["children"].append(node)

    used = data.get("used")
    candidates = _candidates(roots, set(used)) if used is not None else None

    def order(children):
        children.sort(key=lambda n: -(n["live"] or 0))
        for c in children:
            order(c["children"])

    order(roots)

    recorded = {r["name"] for r in records}
    at_start = set(data["loaded_at_start"]) - recorded
    own = set(data["loaded_before"]) - set(data["loaded_at_start"]) - recorded
    aliases, direct = {}, []
    for name, real in data["sys_modules"].items():
        if name in recorded or name in at_start or name in own:
            continue
        if real is not None and real != name:
            aliases[name] = real
        else:
            direct.append(name)
    total = sum(n["live"] or 0 for n in roots)
    return {
        "version": 1,
        "pid": data["pid"],
        "command": data["argv"],
        "counters": data["counters"],
        "modules_imported": len(records),
        "live_imported": total,
        "live_at_start": data["live_at_start"],
        "live_at_end": data["live_now"],
        "hook_live": data.get("hook_live"),
        "loaded_at_start": sorted(at_start),
        "loaded_by_ebb": sorted(own),
        "aliases": aliases,
        "added_to_sys_modules": sorted(direct),
        "failed": [n["name"] for n in nodes if "error" in n],
        "uncaught": data.get("uncaught"),
        "tree": roots,
        "lazy_candidates": candidates,
    }


def _candidates(roots, used):
    """The modules a lazy import could defer: the tops of subtrees none of whose functions ran.

    A package is needed when one of its submodules is (importing a.b imports
    a), and C modules are left out: their methods are not seen running, and
    whether to import them is their Python module's business."""
    needed = set()

    def walk(node):
        below = [walk(c) for c in node["children"]]  # every child: each gets its flag
        node["used"] = node["name"] in used
        node["_needed"] = node["used"] or node["name"] in needed or "error" in node or any(below)
        return node["_needed"]

    while True:
        for root in roots:
            walk(root)
        more = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            stack += node["children"]
            if node["_needed"]:
                name = node["name"]
                while "." in name:
                    name = name.rpartition(".")[0]
                    if name not in needed:
                        more.add(name)
        if not more - needed:
            break
        needed |= more

    found = []

    def pick(node, parent_needed):
        if not node["_needed"] and parent_needed and node["kind"] in ("python", "frozen"):
            found.append({"name": node["name"], "live": node["live"], "imported_by": node["imported_by"],
                          "at": node["at"]})
        for c in node["children"]:
            pick(c, node["_needed"])
        del node["_needed"]

    for root in roots:
        pick(root, True)
    found.sort(key=lambda c: -(c["live"] or 0))
    return found


# ---- text -------------------------------------------------------------------

def _count(n):
    return "-" if n is None else f"{n:,}"


def render(report, min_bytes):
    """The report as text: the tree, folded below min_bytes, then the candidates."""
    exact = report["counters"] == "libebb"
    lines = [
        f"ebb imports: {_plural(report['modules_imported'], 'module')} imported, {human(report['live_imported'])} live after "
        f"their imports ({'libebb counters' if exact else 'tracemalloc: libebb was not loaded; no objects or allocated bytes'})",
        f"  at start: {human(report['live_at_start'])} live, {len(report['loaded_at_start'])} modules loaded "
        f"before the measurement and {len(report['loaded_by_ebb'])} by ebb imports itself (not measured); at the "
        f"end: {human(report['live_at_end'])} live, of which {human(report['hook_live'])} are ebb imports' own records "
        "(left out of the modules' figures)",
        "",
    ]
    header = f"{'live':>8} {'self':>8} {'allocated':>9} {'objects':>9} {'ms':>8}  module"
    lines.append(header)
    rows = []

    def walk(children, prefix):
        shown = [c for c in children if (c["live"] or 0) >= min_bytes or "error" in c]
        folded = [c for c in children if c not in shown]
        for i, c in enumerate(shown):
            last = i == len(shown) - 1 and not folded
            branch = "" if prefix is None else prefix + ("└─ " if last else "├─ ")
            note = ""
            if prefix is None and c.get("at"):
                note = f"  ({_short(c['at'])})"
            if "error" in c:
                note += f"  FAILED: {c['error']}"
            rows.append(f"{human(c['live']):>8} {human(c['self_live']):>8} {human(c['allocated']):>9} "
                        f"{_count(c['objects']):>9} {c['ms']:>8.1f}  {branch}{c['name']}{note}")
            walk(c["children"], "" if prefix is None else prefix + ("   " if last else "│  "))
        if folded:
            branch = "" if prefix is None else prefix + "└─ "
            size = sum(c["live"] or 0 for c in folded)
            count = sum(_subtree_size(c) for c in folded)
            rows.append(f"{human(size):>8} {'':>8} {'':>9} {'':>9} {'':>8}  {branch}({_plural(count, 'more module')}, "
                        f"each under {human(min_bytes)})")

    walk(report["tree"], None)
    lines += rows
    cand = report["lazy_candidates"]
    if cand is not None:
        lines.append("")
        if cand:
            lines.append("Lazy-import candidates: none of their functions ran (nor those of what they imported "
                         "first); importing them where they are used would save at start:")
            shown = [c for c in cand if (c["live"] or 0) >= min_bytes]
            for c in shown:
                by = f"imported by {c['imported_by']}" if c["imported_by"] else "imported"
                lines.append(f"{human(c['live']):>8}  {c['name']}  ({by} at {_short(c['at'])})")
            if len(shown) < len(cand):
                rest = cand[len(shown):]
                lines.append(f"{human(sum(c['live'] or 0 for c in rest)):>8}  ({len(rest)} more, each under "
                             f"{human(min_bytes)}; --json lists them)")
        else:
            lines.append("Lazy-import candidates: none (a function of every module ran)")
    if report["failed"]:
        lines.append("")
        lines.append(f"Failed imports: {', '.join(report['failed'])}")
    if report["uncaught"]:
        lines.append("")
        lines.append(f"The program ended with an exception: {report['uncaught']}")
    return "\n".join(lines) + "\n"


def _plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _subtree_size(node):
    return 1 + sum(_subtree_size(c) for c in node["children"])


def _short(at):
    if not at:
        return "?"
    path, colon, line = at.rpartition(":")
    if not colon:
        return at  # "ebb run --preload"
    cwd = os.getcwd() + os.sep
    if path.startswith(cwd):
        path = path[len(cwd):]
    return f"{path}:{line}"


def text(data, fmt, min_bytes):
    """The report of the sitecustomize hook's `data`, as JSON or text."""
    report = build(data)
    return json.dumps(report, indent=1) + "\n" if fmt == "json" else render(report, min_bytes)


def task_done():
    """ebb.celery and ebb.rq call this after each task: under `ebb imports --tasks N`
    the report is written after the Nth (in the process that runs the tasks)."""
    hook = sys.modules.get("ebb_imports_hook")
    if hook is not None:
        try:
            hook.task_done()
        except Exception:  # noqa: BLE001 - a report never fails a task
            pass


# ---- python3 -m ebb.imports ---------------------------------------------------

def boot_dir():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_imports_boot")


def environment(out, fmt, min_bytes, usage=False, after=None, base=None):
    """The environment that makes a Python command measure its imports into `out`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([boot_dir()] + [p for p in [env.get("PYTHONPATH")] if p])
    env["EBB_IMPORTS_OUT"] = out
    env["EBB_IMPORTS_FORMAT"] = fmt
    env["EBB_IMPORTS_MIN"] = str(min_bytes)
    if usage:
        env["EBB_IMPORTS_USAGE"] = "1"
    if after is not None:
        env["EBB_IMPORTS_FOR"] = str(after)
    return env


def _program(modules, then, failed):
    """The -c program: each import, with one clear line (and the file `failed`) if it fails, then the workload."""
    lines = []
    for m in modules:
        lines += [
            "try:",
            f"    import {m}",
            "except BaseException as e:",
            "    import sys",
            f"    sys.stderr.write('ebb.imports: cannot import {m}: %s: %s\\n' % (type(e).__name__, e))",
            f"    open({failed!r}, 'w').close()",
            "    raise SystemExit(1)",
        ]
    if then:
        lines.append(then)
    return "\n".join(lines) + "\n"


def main(argv=None):
    import argparse  # here: the fork server of `ebb run --preload` imports this module for build()
    import subprocess
    import tempfile
    p = argparse.ArgumentParser(
        prog="python3 -m ebb.imports",
        description="Import MODULEs in a fresh interpreter and print what each import keeps in memory, as a tree.",
        epilog="Run it under libebb (ebb run, or LD_PRELOAD=libebb.so PYTHONMALLOC=malloc) for exact bytes and "
        "object counts; without it tracemalloc is used. Any Python command: ebb imports -- COMMAND. "
        "See docs/imports.md.")
    p.add_argument("modules", nargs="+", metavar="MODULE", help="modules to import, in this order")
    p.add_argument("--json", action="store_true", help="print the report as JSON (every module, never folded)")
    p.add_argument("--min", default="64K", metavar="SIZE",
                   help="fold modules keeping less than SIZE in the text report (default: 64K; 0: show all)")
    p.add_argument("--then", metavar="CODE",
                   help="run CODE after the imports, and list the modules none of whose functions ran: "
                   "candidates for a lazy import")
    a = p.parse_args(argv)
    try:
        min_bytes = parse_size(a.min)
    except ValueError:
        p.error(f"--min wants a size such as 64K, not {a.min!r}")
    for m in a.modules:
        if not all(part.isidentifier() for part in m.split(".")):
            p.error(f"not a module name: {m!r}")
    with tempfile.TemporaryDirectory(prefix="ebb-imports.") as tmp:
        out = os.path.join(tmp, "report")
        env = environment(out, "json" if a.json else "text", min_bytes, usage=a.then is not None)
        failed = os.path.join(tmp, "failed")
        rc = subprocess.call([sys.executable, "-c", _program(a.modules, a.then, failed)], env=env)
        if os.path.exists(failed):
            return 1  # the child said which import failed
        if not os.path.exists(out):
            sys.stderr.write(f"ebb.imports: the interpreter wrote no report (exit status {rc})\n")
            return 1
        with open(out) as f:
            sys.stdout.write(f.read())
        if rc != 0:
            sys.stderr.write(f"ebb.imports: the code exited with status {rc}\n")
        return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
