#!/usr/bin/python3
"""Allocator name -> environment for a benchmarked child process.

Every preloaded allocator (ebb and the peers) runs with PYTHONMALLOC=malloc so
that it sees all of CPython's allocations, small objects included; `pymalloc`
is CPython's default (no preload, no PYTHONMALLOC).  Peer libraries are found
with `dpkg -L <package>`; a library that is absent is reported on stderr and
skipped.  Run this file to list the allocators and their status.

`ebb:VAR=VALUE[:VAR=VALUE...]` is ebb with libebb's own settings, e.g.
`ebb:EBB_PURGE_DELAY_MS=1000` or `ebb:EBB_BACKGROUND=0`, to measure what a
setting trades. `ebb@/path/to/libebb.so` is another build of libebb, to
compare two builds in one run.

`floor` is not an allocator to use but a reference point for speed: the
least work a preloaded allocator can do per call (bench/floor/floor_alloc.cc:
unchecked free lists, no memory ever given back). It is not part of `all`.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

PYTHON = "/usr/bin/python3"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_EBB_LIB = BENCH_DIR.parent / "build" / "lib" / "libebb.so"
FLOOR_LIB = BENCH_DIR.parent / "build" / "lib" / "libfloor_alloc.so"

# Debian package and a pattern for the library file it ships.
PEER_PACKAGES = {
    "jemalloc": ("libjemalloc2", r"/libjemalloc\.so\.2$"),
    "mimalloc": ("libmimalloc2.0", r"/libmimalloc\.so\.2$"),
    "tcmalloc": ("libtcmalloc-minimal4", r"/libtcmalloc_minimal\.so\.4$"),
}

# Variables that must not leak from the caller's environment into a run.
CONTROLLED = ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF", "EBB_BENCH_TRIM",
              "EBB_PURGE_DELAY_MS", "EBB_EMPTY_DELAY_MS", "EBB_BACKGROUND", "EBB_TCACHE_BYTES", "EBB_LARGE_CACHE_MB")

NAMES = ["ebb", "glibc", "glibc+trim", "jemalloc", "jemalloc-decay0",
         "mimalloc", "tcmalloc", "pymalloc"]
REFERENCES = ["floor"]  # accepted by name, not part of "all"


def ebb_lib():
    return Path(os.environ.get("EBB_LIB", DEFAULT_EBB_LIB))


def dpkg_lib(package, pattern):
    """Path of the library matching pattern in `dpkg -L package`, or None."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if re.search(pattern, line) and os.path.exists(line):
            return Path(line)
    return None


def spec(name):
    """(extra environment, error) for an allocator; error is None if usable."""
    if name == "pymalloc":
        return {}, None
    if name == "glibc":
        return {"PYTHONMALLOC": "malloc"}, None
    if name == "glibc+trim":
        return {"PYTHONMALLOC": "malloc", "EBB_BENCH_TRIM": "1"}, None
    settings = {}
    if name.startswith("ebb:"):
        for item in name[4:].split(":"):
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("EBB_"):
                return None, f"bad ebb setting {item!r} (want EBB_NAME=VALUE)"
            settings[key] = value
        name = "ebb"
    if name.startswith("ebb@"):  # another build of libebb, to compare two in one run
        lib = Path(name[4:])
        if not lib.is_file():
            return None, f"{lib} not found"
    elif name == "ebb":
        lib = ebb_lib()
        if not lib.is_file():
            return None, f"{lib} not found (build ebb or set EBB_LIB)"
    elif name == "floor":
        lib = FLOOR_LIB
        if not lib.is_file():
            return None, f"{lib} not found (make build)"
    elif name in ("jemalloc", "jemalloc-decay0", "mimalloc", "tcmalloc"):
        package, pattern = PEER_PACKAGES[name.split("-")[0]]
        lib = dpkg_lib(package, pattern)
        if lib is None:
            return None, f"library of Debian package {package} not found"
    else:
        return None, f"unknown allocator (known: {', '.join(NAMES + REFERENCES)})"
    env = {"LD_PRELOAD": str(lib), "PYTHONMALLOC": "malloc", **settings}
    if name == "jemalloc-decay0":
        env["MALLOC_CONF"] = "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0"
    return env, None


def environment(extra):
    """The caller's environment with CONTROLLED variables replaced by extra."""
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(extra)
    return env


def resolve(names):
    """[(name, full environment)] for the usable allocators among names.

    Unusable ones are reported on stderr and skipped.
    """
    usable = []
    for name in names:
        extra, error = spec(name)
        if error:
            print(f"skipping allocator {name}: {error}", file=sys.stderr)
        else:
            usable.append((name, environment(extra)))
    return usable


def run_child(cmd, env, timeout):
    """Run cmd; return its stdout, or raise RuntimeError saying what failed."""
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout} s") from None
    if p.returncode != 0:
        how = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"exit status {p.returncode}")
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{how}{': ' + tail if tail else ''}")
    return p.stdout


def finish(out, errors, json_path, data):
    """Common end of the runners: list failures, write --json, exit 1 if any run failed."""
    if errors:
        print("\nFailures:\n" + "\n".join(f"- {e}" for e in errors), file=out)
    if json_path:
        text = json.dumps({**data, "errors": errors}, indent=1)
        if json_path == "-":
            print(text)
        else:
            Path(json_path).write_text(text + "\n")
    sys.exit(1 if errors else 0)


def split_names(text):
    """Parse a comma-separated --allocators value ("all" = every allocator)."""
    return NAMES if text == "all" else [n.strip() for n in text.split(",") if n.strip()]


def main():
    argparse.ArgumentParser(description=__doc__).parse_args()
    for name in NAMES + REFERENCES:
        extra, error = spec(name)
        shown = " ".join(f"{k}={v}" for k, v in extra.items()) if extra is not None else ""
        print(f"{name:16} {'MISSING: ' + error if error else shown or '(default CPython)'}")


if __name__ == "__main__":
    main()
