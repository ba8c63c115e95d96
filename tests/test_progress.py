"""Progress bars: Rich in a real terminal (a pseudo-terminal here), tqdm lines when output goes to a pipe."""

import os
import pty
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_in_terminal(args: list[str], cwd) -> tuple[int, str]:
    """Run a process with stdin/stdout/stderr on a pseudo-terminal, as a user's shell would; return (code, screen)."""
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TERM": "xterm-256color",
           "COLUMNS": "120"}
    process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return process.wait(timeout=300), output.decode(errors="replace")


def test_track_draws_a_rich_bar_in_a_terminal_and_tqdm_lines_in_a_pipe(tmp_path):
    code = "from ddpmlab.progress import track\nfor _ in track(range(30), total=30, desc='demo'): pass"
    status, screen = run_in_terminal([sys.executable, "-c", code], tmp_path)
    assert status == 0 and "demo" in screen and "30/30" in screen and "━" in screen, screen[-1000:]
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "demo: 100%" in piped.stderr and "━" not in piped.stderr  # tqdm: plain lines a log file can hold


@pytest.mark.slow
def test_training_in_a_terminal_shows_rich_bars(tmp_path):
    status, screen = run_in_terminal([sys.executable, str(ROOT / "train.py"), "experiment=smoke",
                                      f"paths.log_dir={tmp_path}"], tmp_path)
    assert status == 0, screen[-2000:]
    assert "Epoch 0/" in screen and "━" in screen  # Lightning's RichProgressBar
    assert "sampling" in screen  # the sample grid's chain, printed above the training bar


def test_a_bar_writes_its_progress_into_the_run_log_file(tmp_path):
    """Hydra's job log is a FileHandler on the root logger: a bar's lines reach it (the bar itself goes to stderr)."""
    code = ("import logging, sys\nfrom ddpmlab.progress import track\n"
            f"logging.basicConfig(filename={str(tmp_path / 'job.log')!r}, level=logging.INFO)\n"
            "seen = []\nfor _ in track(range(5), total=5, desc='phase', first_done=seen.append): pass\n"
            "assert len(seen) == 1 and seen[0] >= 0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "job.log").read_text().splitlines()
    assert any("phase: 1/5" in line for line in lines) and any("phase: 5/5" in line for line in lines), lines
    assert "phase: 5/5" not in done.stdout
