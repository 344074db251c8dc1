"""Progress bars as a user sees them: in a real pseudo-terminal, training draws a bar per
epoch (batches done, running loss) and a sweep one for its trials (done of n_trials, best so
far); under CI=true or into a pipe nothing but the log lines, which are there either way."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from imgpipe import progress
from imgpipe.errors import PipelineError
from imgpipe.testing import REPO

# A redraw: a carriage return that does not end a line (the terminal turns "\n" into "\r\n").
REDRAW = re.compile(r"\r(?!\n)")
EPOCH_LINE = re.compile(r"epoch (\d/\d)  train loss \d\.\d{4} acc")


def in_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``src/train_model.py ARGS`` with stdin, stdout and stderr on a new pseudo-terminal
    of 160 columns; everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no end after {timeout}s: {b''.join(chunks)[-2000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=30) == 0, b"".join(chunks)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def user_env(**changes: str) -> dict[str, str]:
    """The environment of a person at a terminal: no CI, no explicit switch."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", progress.PROGRESS_ENV)}
    # tqdm redraws at most every 0.1 s by default: on a fast machine an epoch would show
    # once; TQDM_MININTERVAL=0 draws every update, so the test sees every count.
    return {**env, "TERM": "xterm", "TQDM_MININTERVAL": "0", **changes}


def train_args(data: Path, root: Path) -> list[str]:
    return [
        f"data_dir_path={data}",
        "epochs=2",
        "log_interval=2",
        "setup_mlflow=false",
        "live_images=false",  # its PNGs cost about 1 s and show no bar
        f"model_checkpoint_dir_path={root / 'models'}",
        f"live_dir_path={root / 'dvclive'}",
        f"log_dir={root / 'logs'}",
    ]


@pytest.mark.slow
def test_training_in_a_terminal_draws_a_bar_per_epoch(sample_processed: Path, tmp_path: Path):
    output = in_terminal(train_args(sample_processed, tmp_path), tmp_path, user_env())
    # tqdm's line: "epoch 1/2:  45%|####5     | 10/22 [00:00<00:00, 35.1batch/s, loss 1.2345]"
    drawn = re.findall(
        r"epoch ([12])/2: +\d+%\|[^|]*\| (\d+)/(\d+) \[[^]]*loss (\d\.\d{4})\]", output
    )
    assert {epoch for epoch, *_ in drawn} == {"1", "2"}, output[-3000:]
    done = sorted({int(n) for _, n, _, _ in drawn})
    total = {int(t) for _, _, t, _ in drawn}
    # It moves, in steps of log_interval, from the first update to the epoch's last.
    (steps,) = total
    assert done == list(range(2, steps + 1, 2)), (done, steps)
    assert REDRAW.search(output)
    assert EPOCH_LINE.findall(output) == ["1/2", "2/2"]  # the per-epoch log lines stay


@pytest.mark.slow
def test_under_ci_or_into_a_pipe_only_the_log_lines(sample_processed: Path, tmp_path: Path):
    # Both at once: two cores, half the wait.
    piped = subprocess.Popen(
        [sys.executable, "-u", str(REPO / "src" / "train_model.py"),
         *train_args(sample_processed, tmp_path / "pipe"), "epochs=1"],
        cwd=tmp_path, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ci = in_terminal(
            [*train_args(sample_processed, tmp_path / "ci"), "epochs=1"],
            tmp_path,
            user_env(CI="true"),
        )
        out, err = piped.communicate(timeout=120)
    finally:
        if piped.poll() is None:
            piped.kill()
            piped.wait()
    assert not REDRAW.search(ci) and "batch/s" not in ci, ci[-3000:]
    assert EPOCH_LINE.findall(ci) == ["1/1"]
    assert piped.returncode == 0, err[-3000:]
    assert "\r" not in out + err and "batch/s" not in err
    assert EPOCH_LINE.findall(err) == ["1/1"]


@pytest.mark.slow
def test_a_sweep_in_a_terminal_counts_trials_and_shows_the_best(
    sample_processed: Path, tmp_path: Path
):
    args = [
        "--multirun",
        *train_args(sample_processed, tmp_path),
        "epochs=1",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'sweep' / 'results'}",
    ]
    output = in_terminal(args, tmp_path, user_env())
    drawn = re.findall(r"sweep: +\d+%\|[^|]*\| (\d)/2 \[([^]]*)\]", output)
    counts = [int(n) for n, _ in drawn]
    assert counts and counts == sorted(counts) and {0, 2} <= set(counts), output[-3000:]
    # Best so far on the first objective, once a trial has finished.
    best = [re.search(r"best (\d\.\d+) \((\S+)\)", extra) for n, extra in drawn if n != "0"]
    assert best and all(best), drawn
    assert {m.group(2) for m in best} <= {"minimize", "val/loss", "val_loss"}
    # The trials' epoch bars, under the sweep's.
    assert re.search(r"epoch 1/1: +\d+%", output), output[-3000:]
    assert output.count("sweep done: best trial") == 1


@pytest.mark.parametrize(
    ("env", "tty", "shown"),
    [
        ({}, True, True),
        ({}, False, False),
        ({"CI": "true"}, True, False),
        ({"IMGPIPE_PROGRESS": "off"}, True, False),
        ({"IMGPIPE_PROGRESS": "on"}, False, True),
        ({"IMGPIPE_PROGRESS": "on", "CI": "true"}, False, True),
        ({"RANK": "1"}, True, False),  # torchrun: one bar for the job, rank 0's
        ({"RANK": "1", "IMGPIPE_PROGRESS": "on"}, True, False),
    ],
)
def test_the_policy(monkeypatch: pytest.MonkeyPatch, env, tty: bool, shown: bool) -> None:
    for var in ("CI", "IMGPIPE_PROGRESS", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    master, slave = pty.openpty() if tty else os.pipe()  # (read, write) ends
    with os.fdopen(slave, "w") as stream:
        assert progress.enabled(stream) is shown
    os.close(master)


def test_a_bad_switch_is_one_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_PROGRESS", "sometimes")
    with pytest.raises(
        PipelineError, match=r"^IMGPIPE_PROGRESS='sometimes': expected auto, on or off$"
    ):
        progress.enabled()


def test_a_sweep_worker_draws_no_bar_and_clears_the_main_bar_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With several workers only the main process draws; a worker's log line on the same
    terminal first clears the bar's line rather than starting at its end."""
    for var in ("CI", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IMGPIPE_PROGRESS", "auto")  # restored after the test
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        root = logging.getLogger()
        monkeypatch.setattr(root, "handlers", [logging.StreamHandler(terminal)])
        progress.hide_in_this_process()
        assert not progress.enabled(terminal)
        logging.getLogger("imgpipe.sweep").warning("trial 3 failed: diverged")
        terminal.flush()
        assert os.read(master, 4096) == b"\r\x1b[Ktrial 3 failed: diverged\r\n"
    os.close(master)
