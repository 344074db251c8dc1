"""One training on several processes (torchrun, gloo on the CPU): the same model as one
process, tracked once, resumed bit for bit after kills, restarted by torchrun, on two
"nodes" meeting through c10d on 127.0.0.1, and from `dvc exp run -S nproc_per_node=2`."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from helpers import assert_same_weights, error_lines
from imgpipe import checkpoint
from imgpipe.distributed import Group, first_message
from imgpipe.errors import PipelineError
from imgpipe.sweep.worker import gpu_for_worker, visible_gpus
from imgpipe.testing import REPO, dvc, empty_store, free_port, make, run_outputs, train_config
from imgpipe.train import train

EPOCHS = 10  # enough for 1 and 2 processes to agree on test accuracy within half a point


# --------------------------------------------------------------------------- helpers


class Launch:
    """``python -m imgpipe.distributed ... src/train_model.py`` (what `make train NPROC=2`
    runs) in its own session, its output read line by line as it comes."""

    def __init__(self, root: Path, data: Path, store: Path, torchrun: list[str], *extra: str):
        overrides = {
            "data_dir_path": str(data),
            "epochs": str(EPOCHS),
            "mlflow_tracking_uri": f"sqlite:///{store}",
            "mlflow_exp_name": root.name,
            "nproc_per_node": "2",
            **run_outputs(root),
        }
        cmd = [sys.executable, "-m", "imgpipe.distributed", *torchrun]
        cmd += [str(REPO / "src" / "train_model.py"), *(f"{k}={v}" for k, v in overrides.items())]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*cmd, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_epoch(self, epoch: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        mark = f"epoch {epoch}/{EPOCHS} "
        while not any(mark in line for line in self.lines):
            assert self.proc.poll() is None, self.output
            assert time.monotonic() < deadline, f"no {mark!r} in time:\n{self.output}"
            time.sleep(0.05)

    def worker(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.environ().get("RANK") == str(rank):
                return child
        raise AssertionError(f"no worker of rank {rank}")

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.kill()
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """SIGKILL to the launcher and every worker (torchrun starts each in a session
        of its own), then wait until none is left."""
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def history(root: Path, store: Path) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) pairs in the MLflow run the final checkpoint names."""
    from mlflow import MlflowClient

    run_id = checkpoint.load(root / "models" / checkpoint.CHECKPOINT_FILE)["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{store}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    return {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        for name in run.data.metrics
    }


def runs_in(experiment: str, store: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def assert_same_training(root: Path, straight: Path, store: Path) -> None:
    assert_same_weights(
        root / "models" / checkpoint.MODEL_FILE, straight / "models" / checkpoint.MODEL_FILE
    )
    logged = history(root, store)
    assert logged == history(straight, store)
    for name, points in logged.items():  # once per epoch (test only after the last one)
        assert len({step for step, _ in points}) == len(points), name
    assert len(runs_in(root.name, store)) == 1, "one MLflow run, continued across restarts"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return empty_store(tmp_path_factory.mktemp("ddp-store") / "mlflow.db")


@pytest.fixture(scope="module")
def straight(
    tmp_path_factory: pytest.TempPathFactory, sample_processed: Path, store: Path
) -> Iterator[Path]:
    """The uninterrupted 2-process run every other run is compared with."""
    root = tmp_path_factory.mktemp("ddp") / "straight"
    run = Launch(root, sample_processed, store, ["--standalone", "--nproc-per-node=2"])
    assert run.finish() == 0, run.output
    yield root


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_processes_train_like_one_and_track_once(
    straight: Path, sample_processed: Path, store: Path, tmp_path: Path
) -> None:
    one = train(
        train_config(
            sample_processed, tmp_path / "one", store=store, epochs=EPOCHS, mlflow_exp_name="one"
        )
    )
    (run,) = runs_in("straight", store)  # one MLflow run for the two processes
    assert abs(run.data.metrics["test/accuracy"] - one.test_accuracy) <= 0.005
    assert run.data.tags["world_size"] == "2"
    for name, points in history(straight, store).items():
        assert len(points) == len({step for step, _ in points}), f"{name} logged twice"
    # Rank 0 alone writes: one checkpoint folder, one dvclive folder, one log of each epoch.
    assert sorted(p.name for p in straight.iterdir()) == ["dvclive", "logs", "models"]
    logged = "".join(p.read_text() for p in (straight / "logs").iterdir())
    assert logged.count(f"epoch {EPOCHS}/{EPOCHS} ") == 1
    state = checkpoint.TrainingState.from_dict(
        checkpoint.load(straight / "models" / checkpoint.CHECKPOINT_FILE)
    )
    assert state.world_size == 2 and len(state.rank_rngs) == 2
    # Each rank's own dropout stream: the two RNG states differ.
    assert not torch.equal(state.rank_rngs[0]["torch"], state.rank_rngs[1]["torch"])


@pytest.mark.slow
def test_killed_twice_and_resumed_ends_like_the_straight_run(
    straight: Path, sample_processed: Path, store: Path, tmp_path: Path
) -> None:
    seed = random.randrange(1_000_000)
    print(f"kill moments drawn with seed {seed}")
    draw = random.Random(seed)
    root = tmp_path / "killed"
    torchrun = ["--standalone", "--nproc-per-node=2"]

    # 1: every process SIGKILLed at once, somewhere in the first half
    first = Launch(root, sample_processed, store, torchrun)
    first.wait_for_epoch(draw.randint(1, EPOCHS // 2))
    time.sleep(draw.uniform(0, 0.5))
    first.kill()

    # 2: resumed, then one worker SIGKILLed: the group ends with one line naming it
    second = Launch(root, sample_processed, store, torchrun, "resume=true")
    resumed_at = checkpoint.load(root / "models" / checkpoint.CHECKPOINT_FILE)["epoch"]
    second.wait_for_epoch(draw.randint(resumed_at + 1, EPOCHS - 1))
    time.sleep(draw.uniform(0, 0.5))
    second.worker(draw.choice([0, 1])).kill()
    assert second.finish() != 0
    (line,) = error_lines(second.output)
    assert "SIGKILL" in line and "Traceback" not in second.output, second.output

    # 3: resumed to the end
    third = Launch(root, sample_processed, store, torchrun, "resume=true")
    assert third.finish() == 0, third.output
    assert_same_training(root, straight, store)


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_worker_is_killed(
    straight: Path, sample_processed: Path, store: Path, tmp_path: Path
) -> None:
    root = tmp_path / "restarted"
    run = Launch(
        root, sample_processed, store, ["--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    )
    run.wait_for_epoch(random.randint(1, EPOCHS - 2))
    run.worker(1).kill()
    assert run.finish() == 0, run.output
    assert "resuming after epoch" in run.output  # the restarted group read the checkpoint
    assert_same_training(root, straight, store)


@pytest.mark.slow
def test_two_nodes_meet_through_c10d_on_loopback(
    straight: Path, sample_processed: Path, store: Path, tmp_path: Path
) -> None:
    root = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        Launch(
            root,
            sample_processed,
            store,
            [
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=test-nodes",
            ],
            "nproc_per_node=1",
            "nnodes=2",
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        assert node.finish() == 0, node.output
    assert_same_training(root, straight, store)


@pytest.mark.slow
def test_dvc_exp_run_sets_the_world_size(project: Path) -> None:
    assert make("data", project).returncode == 0
    shown = make("train", project, "-n", "NPROC=2")
    assert "-m imgpipe.distributed --standalone --nproc-per-node=2 src/train_model.py" in (
        shown.stdout
    )
    result = dvc(project, "exp", "run", "train", "-S", "nproc_per_node=2", "-S", "epochs=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "process group: 2 processes" in result.stdout + result.stderr
    state = checkpoint.load(project / "models" / checkpoint.CHECKPOINT_FILE)
    assert state["world_size"] == 2 and len(state["rank_rngs"]) == 2


# --------------------------------------------------------------------------- pieces


def test_the_group_comes_from_torchruns_environment() -> None:
    assert Group.from_env({}) == Group(0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    group = Group.from_env(env)
    assert (group.rank, group.world, group.local_rank, group.local_world) == (3, 4, 1, 2)
    assert group.active and not group.main


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'", id="not-a-number"),
        pytest.param({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 WORLD_SIZE=2", id="rank-too-big"),
    ],
)
def test_a_bad_group_environment_is_one_line(env: dict[str, str], named: str) -> None:
    with pytest.raises(PipelineError, match=named):
        Group.from_env(env)


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        pytest.param([], [None, None, None], id="no-gpu"),
        pytest.param(["0"], ["0", "0", "0"], id="one-gpu"),
        pytest.param(["0", "1", "2", "3"], ["0", "1", "2", "3", "0"], id="four-gpus"),
        pytest.param(["5", "7"], ["5", "7", "5"], id="visible-subset"),
    ],
)
def test_sweep_worker_i_uses_gpu_i_modulo_the_count(
    gpus: list[str], expected: list[str | None]
) -> None:
    assert [gpu_for_worker(i, gpus) for i in range(len(expected))] == expected


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_the_group_says_the_first_own_error_not_a_peers(tmp_path: Path) -> None:
    import json

    records = [
        {"rank": 0, "kind": "peer", "line": "error: rank 0: another process ended", "time": 1.0},
        {"rank": 1, "kind": "error", "line": "error: data/x: unreadable", "time": 2.0},
        {"rank": 2, "kind": "error", "line": "error: later", "time": 3.0},
    ]
    for record in records:
        (tmp_path / f"rank{record['rank']}.json").write_text(json.dumps(record))
    assert first_message(tmp_path) == "error: data/x: unreadable"
    for path in tmp_path.iterdir():
        path.unlink()
    (tmp_path / "rank0.json").write_text(json.dumps(records[0]))
    assert first_message(tmp_path) is None  # the launcher names the process that died


def test_a_checkpoint_without_rank_states_loads_for_every_rank() -> None:
    """Checkpoints written before several processes existed hold one RNG state."""
    rng = {"torch": torch.get_rng_state()}
    old = {
        "format": 2, "epoch": 1, "global_step": 3, "model": {}, "optimizer": {},
        "scheduler": {}, "rng": rng, "history": [], "fingerprint": "f", "mlflow_run_id": None,
    }  # fmt: skip
    state = checkpoint.TrainingState.from_dict(old)
    assert state.world_size == 1 and state.rank_rngs == []
