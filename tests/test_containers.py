"""The stages in the project's image: the commands Make generates for each engine and GPU,
bad input before anything runs, and, with a real Docker engine, `dvc repro` in the container.

Stages must never run as root inside a container, so the engine tests run them as a non-root
caller: the user running the tests, or, when that is root (CI), IMGPIPE_TEST_CALLER, a user
in the docker group that .ci/run creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import IN_CI, error_lines
from imgpipe import checkpoint
from imgpipe.data import export_sample_digits, load_processed
from imgpipe.testing import (
    VENV,
    copy_project,
    dvc,
    free_port,
    make,
    project_env,
    stop,
    wait_until_healthy,
)

DOCKER = os.environ.get("DOCKER", "docker")
UID, GID = os.getuid(), os.getgid()


def dry_run(target: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """The commands `make TARGET` would run (make -n), as one string."""
    base = {"RUNTIME": "", "DOCKER": "docker", "PODMAN": "podman"}
    result = make(target, cwd, "-n", *args, env={**base, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_line(commands: str) -> str:
    (line,) = [line for line in commands.splitlines() if " run --rm " in line]
    return line.rstrip()


# ---- generated commands: no engine needed ----------------------------------------------


@pytest.mark.parametrize(
    ("engine", "gpu", "flags", "image"),
    [
        ("docker", "", [], "imgpipe:cpu"),
        ("docker", "nvidia", ["--gpus=all"], "imgpipe:cuda"),
        ("podman", "nvidia", ["--device=nvidia.com/gpu=all"], "imgpipe:cuda"),
        (
            "docker",
            "amd",
            ["--device=/dev/kfd", "--device=/dev/dri", "--group-add video"],
            "imgpipe:rocm",
        ),
        (
            "podman",
            "amd",
            ["--device=/dev/kfd", "--device=/dev/dri", "--group-add video"],
            "imgpipe:rocm",
        ),
    ],
)
def test_stage_commands_for_each_engine_and_gpu(
    project: Path, engine: str, gpu: str, flags: list[str], image: str
) -> None:
    args = (f"RUNTIME={engine}", f"GPU={gpu}")
    for target in ("train", "sweep"):
        line = run_line(dry_run(target, project, *args))
        assert line.startswith(f"{engine} run --rm --init --user {UID}:{GID} "), line
        # The workspace at its own path: checkpoints and MLflow's artifact paths agree.
        assert f"--volume {project}:{project} --workdir {project}" in line
        assert "--env IMGPIPE_PARAMS_FILE=params.yaml" in line
        for flag in flags:
            assert flag in line, (target, line)
        assert f" {image} python -u src/train_model.py" in line
        # GPU= reaches the code: the stage insists on the GPU instead of falling back.
        assert ("device=cuda" in line) == bool(gpu)
    assert "--multirun" in run_line(dry_run("sweep", project, *args, "WORKERS=2"))
    # Processing never needs the GPU.
    process = run_line(dry_run("process-data", project, *args))
    assert "device=cuda" not in process and "--gpus" not in process and "/dev/kfd" not in process
    assert process.endswith(f"{image} python -u src/process_data.py")


@pytest.mark.parametrize(
    ("engine", "gpu", "flags"),
    [
        pytest.param("docker", "", ["--shm-size=2g"], id="docker-cpu"),
        pytest.param("docker", "nvidia", ["--gpus=all", "--ipc=host"], id="docker-nvidia"),
        pytest.param(
            "podman", "nvidia", ["--device=nvidia.com/gpu=all", "--ipc=host"], id="podman"
        ),
    ],
)
def test_train_on_several_processes_starts_torchrun_in_the_image(
    project: Path, engine: str, gpu: str, flags: list[str]
) -> None:
    line = run_line(dry_run("train", project, f"RUNTIME={engine}", f"GPU={gpu}", "NPROC=2"))
    for flag in flags:
        assert flag in line, line
    assert (
        " python -u -m imgpipe.distributed --standalone --nproc-per-node=2 src/train_model.py"
        in line
    )
    assert line.endswith("nproc_per_node=2 nnodes=1")
    # One process: the plain command, no shared-memory flags.
    single = run_line(dry_run("train", project, f"RUNTIME={engine}", f"GPU={gpu}"))
    assert "imgpipe.distributed" not in single and "--ipc" not in single and "--shm" not in single
    # Several machines meet on the host's network, at the given endpoint.
    nodes = run_line(
        dry_run("train", project, f"RUNTIME={engine}", "NNODES=2", "RDZV_ENDPOINT=node1:29400")
    )
    assert "--network host" in nodes
    assert "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node1:29400" in nodes


def test_world_size_comes_from_params_yaml(project: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("nproc_per_node: 1", "nproc_per_node: 2"))
    commands = dry_run("train", project, "RUNTIME=local")
    assert "-m imgpipe.distributed --standalone --nproc-per-node=2 src/train_model.py" in commands
    assert "imgpipe.distributed" not in dry_run("train", project, "RUNTIME=local", "NPROC=1")
    bad = make("train", project, "NNODES=2", env={"RUNTIME": "local"})
    assert bad.returncode == 2
    assert error_lines(bad.stderr) == [
        "error: NNODES=2 needs RDZV_ENDPOINT=host:port (a machine every node reaches; the same on all)"
    ]


def test_local_runtime_runs_the_entry_point_from_the_venv(project: Path) -> None:
    commands = dry_run("train", project, "RUNTIME=local", "GPU=nvidia", "ARGS=epochs=2")
    assert f"IMGPIPE_PARAMS_FILE=params.yaml {VENV}/bin/python -u src/train_model.py" in commands
    assert "device=cuda epochs=2" in commands and " run --rm " not in commands


def test_tracking_secrets_never_reach_the_command_line(project: Path) -> None:
    secret = "s3cr3t-token"
    on_host = dry_run(
        "train",
        project,
        "RUNTIME=docker",
        env={
            "MLFLOW_TRACKING_URI": f"http://me:{secret}@127.0.0.1:5000",
            "AWS_SECRET_ACCESS_KEY": secret,
        },
    )
    line = run_line(on_host)
    assert secret not in on_host
    # Names only: the engine copies the values from the environment.
    assert "--env MLFLOW_TRACKING_URI " in line and "--env AWS_SECRET_ACCESS_KEY " in line
    assert "--env MLFLOW_HPTUNING_TAG " in line
    # 127.0.0.1 inside a container is the container: a server on the host needs its network.
    assert "--network host" in line
    remote = dry_run(
        "train",
        project,
        "RUNTIME=docker",
        env={"MLFLOW_TRACKING_URI": "https://mlflow.example.com"},
    )
    assert "--network" not in run_line(remote)


def test_automatic_runtime_says_what_it_picked_and_why(project: Path) -> None:
    commands = dry_run("train", project, "DOCKER=/nonexistent/docker", "PODMAN=/nonexistent/podman")
    reason = "running as root" if UID == 0 else "no container engine answers"
    assert re.search(rf'echo "runtime: local \({reason}', commands), commands
    assert f"{VENV}/bin/python -u src/train_model.py" in commands


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("GPU=tpu",), "GPU=tpu"),
        (("RUNTIME=k8s",), "RUNTIME=k8s"),
        (("RUNTIME=docker", "GPU=intel"), "GPU=intel"),
    ],
)
def test_unknown_runtime_or_gpu_is_one_line_before_anything_runs(
    project: Path, args: tuple[str, ...], named: str
) -> None:
    result = make("train", project, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert not (project / "models").exists() and not (project / "data" / "processed").exists()


def test_no_engine_is_one_line_before_anything_runs(project: Path) -> None:
    result = make(
        "train", project, env={"RUNTIME": "docker", "DOCKER_HOST": "unix:///nonexistent.sock"}
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: no docker engine answers"), line
    assert " run --rm " not in result.stdout and not (project / "models").exists()


@pytest.mark.parametrize(
    ("target", "args", "says"),
    [
        ("build", ("GPU=amd",), "GPU=amd needs TORCH_INDEX_URL"),
        ("push", (), "make push needs REGISTRY="),
    ],
)
def test_build_and_push_refuse_incomplete_settings(
    project: Path, target: str, args: tuple[str, ...], says: str
) -> None:
    result = make(target, project, *args)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert says in line


# ---- a real engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def caller() -> pwd.struct_passwd:
    """The non-root user the stages run as."""
    if UID != 0:
        return pwd.getpwuid(UID)
    name = os.environ.get("IMGPIPE_TEST_CALLER", "")
    if not name:
        if IN_CI:
            pytest.fail(
                "tests run as root need IMGPIPE_TEST_CALLER (a non-root user in the docker group)"
            )
        pytest.skip("running as root: set IMGPIPE_TEST_CALLER to a user in the docker group")
    return pwd.getpwnam(name)


def experiment_id(client) -> str:
    return client.get_experiment_by_name("image-classification").experiment_id


def shared_dir(prefix: str) -> Path:
    """A folder another user can reach (pytest's own tmp folders are private to this one)."""
    path = Path(
        tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("IMGPIPE_TEST_SHARED_TMP", "/tmp"))
    )
    path.chmod(0o755)
    return path


def caller_command(
    user: pwd.struct_passwd, cmd: list[str], home: Path, **env: str
) -> tuple[list[str], dict[str, str]]:
    """``cmd`` and its environment as ``user`` (with their groups) would run it."""
    prefix = (
        []
        if user.pw_uid == UID
        else ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
    )
    full_env = project_env(
        {"HOME": str(home), "USER": user.pw_name, "LOGNAME": user.pw_name, **env}
    )
    return prefix + cmd, full_env


def as_caller(user: pwd.struct_passwd, cmd: list[str], cwd: Path, home: Path, **env: str):
    """Run ``cmd`` as ``user`` in a project copy, as they would."""
    full_cmd, full_env = caller_command(user, cmd, home, **env)
    return subprocess.run(
        full_cmd,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def built(docker_engine: str) -> Iterator[Path]:
    """`make build` from a copy of the project (BASE_IMAGE from the environment, as in CI)."""
    root = shared_dir("imgpipe-build-")
    copy = copy_project(root / "project")
    started = time.perf_counter()
    result = make("build", copy, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"make build: {time.perf_counter() - started:.1f}s")
    yield copy
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workspace(built: Path, caller: pwd.struct_passwd) -> Iterator[tuple[Path, Path]]:
    """A project copy with the sample data and a home folder, both owned by the caller."""
    root = shared_dir("imgpipe-ws-")
    copy = copy_project(root / "project")
    export_sample_digits(copy / "data" / "raw")
    home = root / "home"
    home.mkdir()
    subprocess.run(["chown", "-R", f"{caller.pw_uid}:{caller.pw_gid}", str(root)], check=UID == 0)
    yield copy, home
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_in_the_image_as_the_caller(
    workspace: tuple[Path, Path], caller: pwd.struct_passwd, tmp_path: Path
) -> None:
    project, home = workspace
    result = as_caller(
        caller, [str(VENV / "bin" / "dvc"), "repro"], project, home, RUNTIME="docker"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # process_data, train, predict and sweep: each stage in the image.
    assert output.count("runtime: docker (imgpipe:cpu)") == 4, output[-4000:]
    assert output.count(f"docker run --rm --init --user {caller.pw_uid}:{caller.pw_gid} ") == 4

    # Every file the stages wrote belongs to the caller: nothing ran as root in there.
    foreign = [p for p in project.rglob("*") if p.lstat().st_uid != caller.pw_uid]
    assert not foreign, foreign[:5]
    for out in (
        "data/processed/metadata.json",
        "models/model.pt",
        "sweep/results/trials.csv",
        "mlruns/mlflow.db",
    ):
        assert (project / out).is_file(), out

    # The same numbers as a local run of the same code and data.
    local = copy_project(tmp_path / "local")
    export_sample_digits(local / "data" / "raw")
    reference = dvc(local, "repro", "train")
    assert reference.returncode == 0, reference.stderr[-2000:]
    in_container = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert in_container == json.loads((local / "dvclive" / "metrics.json").read_text())
    assert in_container["test"]["accuracy"] >= 0.95

    # Paths are the same inside and out: the host opens the store and the run's model.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id], "tags.optuna_study IS NULL")
    train_runs = [r for r in runs if r.data.tags.get("mlflow.runName") == "train"]
    assert len(train_runs) == 1
    local_copy = client.download_artifacts(
        train_runs[0].info.run_id, "metadata.json", str(tmp_path)
    )
    assert json.loads(Path(local_copy).read_text())["classes"] == [str(i) for i in range(10)]

    # An experiment in a temp copy (`dvc exp run --temp`): the container still reaches the
    # project's store, because the whole repository is mounted at its own path.
    experiment = as_caller(
        caller,
        [str(VENV / "bin" / "dvc"), "exp", "run", "--temp", "-S", "lr=1.4", "train"],
        project,
        home,
        RUNTIME="docker",
    )
    output = experiment.stdout + experiment.stderr
    assert experiment.returncode == 0, output[-4000:]
    assert "runtime: docker (imgpipe:cpu)" in output
    runs = client.search_runs([experiment_id(client)])
    lrs = sorted(r.data.params["lr"] for r in runs if r.data.tags.get("mlflow.runName") == "train")
    assert lrs == ["1.0", "1.4"], lrs
    foreign = [p for p in project.rglob("*") if p.lstat().st_uid != caller.pw_uid]
    assert not foreign, foreign[:5]


@pytest.mark.slow
def test_code_only_change_rebuilds_without_reinstalling_dependencies(built: Path) -> None:
    source = built / "src" / "imgpipe" / "errors.py"
    original = source.read_text()
    source.write_text(original + "# a code-only change\n")
    image = "imgpipe-rebuild:cpu"
    try:
        started = time.perf_counter()
        result = make("build", built, f"IMAGE={image}", timeout=900)
        seconds = time.perf_counter() - started
        assert result.returncode == 0, result.stderr[-3000:]
        log = result.stdout + result.stderr
        step = re.search(r"^#(\d+) \[.*\] RUN .*pip install", log, re.MULTILINE)
        assert step, log[-3000:]
        assert re.search(rf"^#{step.group(1)} CACHED$", log, re.MULTILINE), log[-3000:]
        print(f"code-only rebuild: {seconds:.1f}s")
        shown = subprocess.run(
            [DOCKER, "run", "--rm", image, "tail", "-n", "1", "src/imgpipe/errors.py"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.strip() == "# a code-only change"
    finally:
        source.write_text(original)
        subprocess.run([DOCKER, "rmi", "-f", image], capture_output=True, check=False)


@pytest.mark.slow
def test_image_runs_as_the_non_root_user_by_default(built: Path) -> None:
    who = subprocess.run(
        [DOCKER, "run", "--rm", "imgpipe:cpu", "id", "-u"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert who.stdout.strip() == "2222"


@pytest.mark.slow
def test_missing_image_or_root_caller_is_one_line(
    workspace: tuple[Path, Path], caller: pwd.struct_passwd
) -> None:
    project, home = workspace
    result = as_caller(
        caller, ["make", "train", "IMAGE=imgpipe-missing:cpu"], project, home, RUNTIME="docker"
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "image imgpipe-missing:cpu not found" in line and "make build" in line
    assert not (project / "models").exists()
    if UID == 0:
        as_root = make("train", project, env={"RUNTIME": "docker"})
        assert as_root.returncode == 2
        (line,) = error_lines(as_root.stderr)
        assert "as root would run the stage as root" in line
        assert not (project / "models").exists()


@pytest.mark.slow
def test_push_refused_by_the_registry_is_one_line(built: Path) -> None:
    registry = f"127.0.0.1:{free_port()}/team"
    result = make("push", built, f"REGISTRY={registry}", timeout=300)
    try:
        assert result.returncode == 2
        (line,) = error_lines(result.stderr)
        assert line.startswith(
            f"error: {registry} refused the push of {registry}/imgpipe:0.1.0-cpu"
        )
    finally:
        for tag in subprocess.run(
            [DOCKER, "images", "--format", "{{.Repository}}:{{.Tag}}", f"{registry}/imgpipe"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split():
            subprocess.run([DOCKER, "rmi", tag], capture_output=True, check=False)


@pytest.mark.slow
def test_mlflow_server_in_the_image_serves_the_project_store_on_loopback(
    workspace: tuple[Path, Path], caller: pwd.struct_passwd
) -> None:
    project, home = workspace
    port = free_port()
    cmd, env = caller_command(
        caller, ["make", "mlflow-server"], home, RUNTIME="docker", MLFLOW_PORT=str(port)
    )
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below, after the process
    server = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=log)
    name = f"imgpipe-mlflow-{port}"
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, home / "server.log")
        published = subprocess.run([DOCKER, "port", name], capture_output=True, text=True).stdout
        assert published.strip() == f"5000/tcp -> 127.0.0.1:{port}", published

        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment_id = client.create_experiment("from-the-host")
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "m", 1.5)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.5}
        store = project / "mlruns" / "mlflow.db"
        assert store.is_file() and store.stat().st_uid == caller.pw_uid
    finally:
        stop(server)
        subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, check=False)
        log.close()


def _training_values(project: Path, **values: object) -> None:
    """``values`` written into the copy's params.yaml (what `make train` trains with)."""
    params = project / "params.yaml"
    text = params.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
        assert count == 1, key
    params.write_text(text)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-to-make", "docker-stop"])
def test_a_stop_reaches_the_training_container_and_resume_ends_equal(
    workspace: tuple[Path, Path], caller: pwd.struct_passwd, tmp_path: Path, how: str
) -> None:
    """SIGTERM to `make train` alone (as a scheduler sends it), or `docker stop` on its
    container: the training in the container stops at a batch boundary, the container is
    gone, the checkpoint stays, and `make train` again ends with the numbers of a run never
    stopped (a local one: the image trains like the venv)."""
    project, home = workspace
    values = {"epochs": 6, "train_bs": 8, "resume": "true"}  # epochs of a few seconds
    prep = as_caller(caller, ["make", "process-data"], project, home, RUNTIME="docker")
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    _training_values(project, **values)
    cmd, env = caller_command(
        caller, ["make", "--no-print-directory", "train"], home, RUNTIME="docker"
    )
    proc = subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("epoch 1/6 " in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    listed = [DOCKER, "ps", "-q", "--filter", "ancestor=imgpipe:cpu"]
    (container,) = subprocess.run(listed, capture_output=True, text=True).stdout.split()
    if how == "docker-stop":
        subprocess.run([DOCKER, "stop", container], capture_output=True, check=True, timeout=60)
    else:
        proc.send_signal(signal.SIGTERM)  # make alone
    proc.wait(60)
    reader.join(10)
    output = "".join(lines)
    running = subprocess.run(listed, capture_output=True, text=True).stdout.split()
    assert container not in running, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stopped_at = checkpoint.load(project / "models" / checkpoint.CHECKPOINT_FILE)["epoch"]
    assert 1 <= stopped_at < 6, output[-3000:]

    again = as_caller(caller, ["make", "train"], project, home, RUNTIME="docker")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming after epoch {stopped_at}" in again.stdout + again.stderr

    local = copy_project(tmp_path / "local")
    export_sample_digits(local / "data" / "raw")
    assert make("process-data", local).returncode == 0
    _training_values(local, **values)
    straight = make("train", local)
    assert straight.returncode == 0, straight.stderr[-2000:]
    metrics = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert metrics == json.loads((local / "dvclive" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-to-make", "docker-stop"])
def test_make_serve_in_the_image_answers_as_the_local_model_and_a_stop_leaves_no_container(
    workspace: tuple[Path, Path], caller: pwd.struct_passwd, how: str
) -> None:
    """`make serve RUNTIME=docker`: the server in the project's image gets ready on the
    host's loopback, a real client's /predict answer equals the same model's answer here,
    and SIGTERM to make (as Ctrl-C or a scheduler) or `docker stop` leaves no container."""
    import httpx

    from imgpipe.data import process_dataset
    from imgpipe.inference import Classifier
    from imgpipe.models import build_model, spec_for
    from imgpipe.serve import classify

    project, home = workspace
    process_dataset(project / "data" / "raw", project / "data" / "processed", num_workers=1)
    model = project / "models" / "model.pt"
    model.parent.mkdir()
    spec = spec_for(load_processed(project / "data" / "processed"), "convnet")
    checkpoint.save_model(model, build_model(spec), spec)
    subprocess.run(
        ["chown", "-R", f"{caller.pw_uid}:{caller.pw_gid}", str(project)], check=UID == 0
    )
    image = sorted((project / "data" / "raw" / "test").rglob("*.png"))[0].read_bytes()
    here = classify(Classifier.load(model), image, "PNG", "upload", 3)

    port = free_port()
    cmd, env = caller_command(
        caller,
        ["make", "--no-print-directory", "serve", "MODEL=models/model.pt"],
        home,
        RUNTIME="docker",
        SERVE_PORT=str(port),
    )
    log = open(home / "serve.log", "w")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    listed = [DOCKER, "ps", "-aq", "--filter", "ancestor=imgpipe:cpu"]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (home / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        (container,) = subprocess.run(listed, capture_output=True, text=True).stdout.split()
        published = subprocess.run([DOCKER, "port", container], capture_output=True, text=True)
        assert published.stdout.strip() == f"{port}/tcp -> 127.0.0.1:{port}", published.stdout
        answer = httpx.post(
            f"{url}/predict", content=image, headers={"Content-Type": "image/png"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        served = answer.json()
        assert served["prediction"] == here["prediction"]
        assert [c["class"] for c in served["top_k"]] == [c["class"] for c in here["top_k"]]
        for got, want in zip(served["top_k"], here["top_k"], strict=True):
            assert got["probability"] == pytest.approx(want["probability"], rel=1e-5)
        assert served["model"]["uri"] == "models/model.pt"

        if how == "docker-stop":
            subprocess.run([DOCKER, "stop", container], capture_output=True, check=True, timeout=60)
        else:
            proc.send_signal(signal.SIGTERM)  # make alone
        proc.wait(60)
        deadline = time.monotonic() + 30  # --rm removes the container as it exits
        while subprocess.run(listed, capture_output=True, text=True).stdout.split():
            assert time.monotonic() < deadline, "the server's container is still there"
            time.sleep(0.5)
        output = (home / "serve.log").read_text()
        assert "Traceback" not in output, output[-3000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        stop(proc)
        for left in subprocess.run(listed, capture_output=True, text=True).stdout.split():
            subprocess.run([DOCKER, "rm", "-f", left], capture_output=True, check=False)
        log.close()
