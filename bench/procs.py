"""Small process helpers shared by the fleet benchmarks (bench/*.py)."""
import socket


def free_port():
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid, name, key):
    """The kB figure of line `key` (e.g. "Pss:", "VmHWM:") of /proc/PID/<name>
    (smaps_rollup, status); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    """The pids of `pid`'s children (its main thread's), [] once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
