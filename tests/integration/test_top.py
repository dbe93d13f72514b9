"""ebb top: plain frames when stdout is not a terminal; in a real 80x24
terminal (tmux), a screen that sorts on a key and gives the terminal back."""
import shutil
import subprocess
import time

import pytest

from test_ps import PY


@pytest.fixture
def sleeper():
    p = subprocess.Popen([PY, "-c", "import time; x = bytearray(30 << 20); time.sleep(60)"])
    time.sleep(0.3)
    yield p.pid
    p.kill()
    p.wait()


def test_plain_frames_when_not_a_terminal(ebb_bin, sleeper):
    out = subprocess.run([ebb_bin, "top", "-n", "3", "-d", "0.1", str(sleeper)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout  # no terminal escapes in a pipe
    frames = out.stdout.split("\n\n")
    assert len(frames) == 3
    for f in frames:
        lines = f.strip().splitlines()
        assert lines[0].startswith("ebb top  1 processes")
        assert lines[1].split()[:3] == ["PID", "RSS", "PSS"]
        assert lines[2].split()[0] == str(sleeper)
    assert len(frames[2].strip().splitlines()[2].split()[7]) == 3  # a 3-sample trend by the third frame


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_screen_in_80x24_sorts_and_quits(ebb_bin, sleeper, tmp_path):
    session = f"ebbtop{sleeper}"
    done = tmp_path / "exit"
    cmd = f"{ebb_bin} top -d 0.2 {sleeper}; echo $? > {done}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd], check=True)
    try:
        def screen():
            return subprocess.run(["tmux", "capture-pane", "-t", session, "-p"], capture_output=True,
                                  text=True).stdout
        deadline = time.time() + 10
        while "sort: rss" not in screen() and time.time() < deadline:
            time.sleep(0.1)
        text = screen().splitlines()
        assert text[0].startswith("ebb top") and "sort: rss" in text[0]
        assert all(len(line) <= 80 for line in text)
        assert any(line.split()[:1] == [str(sleeper)] for line in text)
        assert "q quit" in text[-1] or "q quit" in "\n".join(text)
        subprocess.run(["tmux", "send-keys", "-t", session, "p"], check=True)
        deadline = time.time() + 10
        while "sort: pss" not in screen() and time.time() < deadline:
            time.sleep(0.1)
        assert "sort: pss" in screen()
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        # The shell creates the file before echo writes to it: wait for the line.
        deadline = time.time() + 10
        while not (done.exists() and done.read_text().endswith("\n")) and time.time() < deadline:
            time.sleep(0.1)
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
