"""The model factory: the seed CNN as before, timm architectures by name, weights files
checked before any work, optimizers and schedules by name, model.pt that rebuilds itself."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imgpipe import checkpoint
from imgpipe.config import TrainConfig
from imgpipe.errors import PipelineError
from imgpipe.models import (
    ConvNet,
    ModelSpec,
    build_model,
    build_trainable,
    describe,
    load_model_file,
    make_optimizer,
    make_scheduler,
)
from imgpipe.models.optim import cosine_factor
from imgpipe.testing import run_script, train_config
from imgpipe.train import train

CPU = torch.device("cpu")


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def spec(architecture: str = "convnet", channels: int = 1, classes: int = 3, **kw) -> ModelSpec:
    return describe(
        architecture,
        classes=[f"c{i}" for i in range(classes)],
        image_shape=(channels, 32, 32),
        data_mean=(0.25,) * channels,
        data_std=(0.5,) * channels,
        **kw,
    )


@pytest.fixture
def cfg(tmp_path: Path, sample_processed: Path, monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    monkeypatch.chdir(tmp_path)
    return train_config(sample_processed, tmp_path, epochs=2, setup_mlflow=False, live_images=False)


# --------------------------------------------------------------------------- the default


def seed_recipe_weights(cfg: TrainConfig, data_dir: str) -> dict[str, torch.Tensor]:
    """The seed's recipe composed by hand, as train did before the model factory (the seed
    CNN built directly, Adadelta, StepLR by gamma each epoch), over the same data, batch
    order and engine. Computed here rather than stored: float results differ between CPUs
    (oneDNN picks its kernels by instruction set), bit for bit on one machine they do not."""
    from torch.optim.lr_scheduler import StepLR

    from imgpipe.data import load_processed
    from imgpipe.engine import train_one_epoch
    from imgpipe.parts import describe_model
    from imgpipe.rng import seed_everything
    from imgpipe.streaming import open_splits

    data = load_processed(data_dir)
    norm = describe_model(cfg, data)  # the data's own mean and std: no weights file
    split = open_splits(replace(data, mean=norm.mean, std=norm.std), ("train",), CPU, None)
    generator = seed_everything(cfg.seed)
    model = ConvNet(1, 8, 8, 10)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=cfg.lr)
    schedule = StepLR(optimizer, step_size=1, gamma=cfg.gamma)
    for epoch in range(1, cfg.epochs + 1):
        train_one_epoch(model, optimizer, split["train"], cfg.train_bs, generator, epoch, 10)
        schedule.step()
    return model.state_dict()


def test_the_default_trains_the_same_weights_as_before_the_factory(cfg: TrainConfig) -> None:
    assert (cfg.model, cfg.optimizer, cfg.scheduler, cfg.augment) == (
        "convnet",
        "adadelta",
        "step",
        "none",
    )
    train(cfg)
    saved = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / checkpoint.MODEL_FILE)
    expected = seed_recipe_weights(cfg, cfg.data_dir_path)
    assert weights_digest(saved["state_dict"]) == weights_digest(expected)
    # model.pt describes what it holds: rebuilt through the factory, it predicts the same.
    _, described = load_model_file(Path(cfg.model_checkpoint_dir_path) / "model.pt")
    assert described.architecture == "convnet" and described.weights_sha256 is None
    assert described.image_shape == (1, 8, 8) and described.image_mode == "L"
    assert described.classes == tuple(str(d) for d in range(10))
    assert described.resize["resize_filter"].startswith("PIL.Image.Resampling.")
    assert saved["model_name"] == "convnet-v1"  # what older readers look for


# --------------------------------------------------------------------------- the seed CNN


@pytest.mark.parametrize(
    ("channels", "height", "width", "classes"),
    [(1, 8, 8, 10), (3, 10, 12, 3), (1, 28, 28, 10), (3, 224, 224, 2), (1, 1, 1, 2)],
)
def test_the_seed_cnn_follows_the_data(
    channels: int, height: int, width: int, classes: int
) -> None:
    model = ConvNet(channels, height, width, classes).eval()
    out = model(torch.zeros(5, channels, height, width))
    assert out.shape == (5, classes)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_large_images_do_not_blow_up_the_seed_cnn() -> None:
    small = sum(p.numel() for p in ConvNet(3, 32, 32, 10).parameters())
    large = sum(p.numel() for p in ConvNet(3, 512, 512, 10).parameters())
    assert large == small  # adaptive pooling caps fc1's input


def test_a_single_class_is_refused() -> None:
    with pytest.raises(ValueError, match="two classes"):
        ConvNet(1, 8, 8, 1)


# --------------------------------------------------------------------------- by name


@pytest.mark.parametrize(
    ("architecture", "channels"),
    [
        pytest.param("convnet", 1, id="seed-cnn-gray"),
        pytest.param("resnet18", 1, id="resnet-gray"),
        pytest.param("test_efficientnet", 3, id="efficientnet-rgb"),
        pytest.param("test_convnext", 3, id="convnext-rgb"),
    ],
)
def test_any_architecture_by_name_fits_the_data(architecture: str, channels: int) -> None:
    model = build_model(spec(architecture, channels)).eval()
    out = model(torch.zeros(4, channels, 32, 32))
    assert out.shape == (4, 3)
    # every architecture answers log-probabilities, as the seed CNN does
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(4))


def test_an_unknown_architecture_names_the_closest_ones() -> None:
    with pytest.raises(PipelineError) as err:
        spec("resnet19x")
    line = str(err.value)
    assert "unknown architecture 'resnet19x'" in line and "resnet18" in line
    assert "\n" not in line


def test_model_file_round_trip_rebuilds_a_timm_model(tmp_path: Path) -> None:
    described = spec("test_resnet", 1, weights=None)
    torch.manual_seed(0)
    model = build_model(described).eval()
    checkpoint.save_model(tmp_path / "model.pt", model, described)
    loaded, again = load_model_file(tmp_path / "model.pt")
    assert again == described
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- weights files


@pytest.fixture
def resnet_file(tmp_path: Path) -> Path:
    import timm

    torch.manual_seed(3)
    net = timm.create_model("test_resnet", num_classes=1000)  # as published: 1000 classes, RGB
    path = tmp_path / "test_resnet.safetensors"
    save_file(net.state_dict(), str(path))
    return path


def test_weights_from_a_file_get_a_new_head_and_a_gray_first_layer(resnet_file: Path) -> None:
    import timm

    from imgpipe.models.weights import read_state_dict

    described = spec("test_resnet", channels=1, weights=resnet_file)
    assert described.weights_sha256 == hashlib.sha256(resnet_file.read_bytes()).hexdigest()
    # no published normalisation for a test architecture would fall back to the data's;
    # test_resnet has ImageNet's, averaged over RGB for one channel
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert described.mean == pytest.approx((sum(cfg.mean) / 3,))
    parts = build_trainable(described, device=CPU, lr=0.1, weights=resnet_file)
    loaded, published = parts.model.state_dict(), read_state_dict(resnet_file)
    body = [k for k in published if not k.startswith(("fc.", "conv1."))]
    assert all(torch.equal(loaded[f"net.{k}"], published[k]) for k in body)
    assert loaded["net.fc.weight"].shape == (3, published["fc.weight"].shape[1])
    first = f"{cfg.first_conv}.weight"  # summed over RGB, as timm adapts it
    torch.testing.assert_close(loaded[f"net.{first}"], published[first].sum(dim=1, keepdim=True))


def bad_weights(tmp_path: Path, kind: str) -> Path:
    import timm

    path = tmp_path / {"missing": "nope.pth", "text": "w.pth", "list": "w.pth"}.get(kind, "w.pth")
    if kind == "text":
        path.write_text("not weights")
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "code":
        torch.save({"head": torch.nn.Linear(2, 2)}, path)  # a pickled module: code on load
    elif kind == "other-architecture":
        path = path.with_suffix(".safetensors")
        save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    elif kind == "other-size":
        net = timm.create_model("test_resnet", num_classes=1000)
        state = net.state_dict()
        key = next(k for k in state if k.endswith("layer1.0.conv1.weight"))
        state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        pytest.param("missing", "does not exist", id="missing"),
        pytest.param("text", "not a torch file", id="not-a-torch-file"),
        pytest.param("list", "not a state dict", id="not-a-state-dict"),
        pytest.param("code", "holds code", id="holds-code"),
        pytest.param("other-architecture", "does not fit test_resnet", id="other-architecture"),
        pytest.param("other-size", "layer1.0.conv1.weight", id="a-tensor-of-another-shape"),
    ],
)
def test_a_bad_weights_file_stops_before_any_work_naming_it(
    kind: str, says: str, cfg: TrainConfig, tmp_path: Path
) -> None:
    path = bad_weights(tmp_path, kind)
    run = replace(cfg, model="test_resnet", model_weights=str(path))
    before = set(tmp_path.iterdir())
    with pytest.raises(PipelineError) as err:
        train(run)
    line = str(err.value)
    assert str(path) in line and says in line and "\n" not in line
    assert set(tmp_path.iterdir()) == before  # no models/, no dvclive/: nothing written


def test_bad_model_input_is_one_error_line_and_exit_2(
    sample_processed: Path, tmp_path: Path
) -> None:
    result = run_script(
        "train_model.py",
        "model=efficientnet_lite",
        f"data_dir_path={sample_processed}",
        "setup_mlflow=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: config key 'model': unknown architecture")
    assert "efficientnet_lite0" in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("name", "kind", "extra"),
    [
        ("adadelta", torch.optim.Adadelta, {}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        ("adamw", torch.optim.AdamW, {}),
    ],
)
def test_optimizers_by_name_with_weight_decay(name: str, kind: type, extra: dict) -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = make_optimizer(name, params, lr=0.5, weight_decay=0.01, **extra)
    assert isinstance(opt, kind)
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.01
    for key, value in extra.items():
        assert group[key] == value


def test_cosine_warms_up_then_decays_to_zero_at_the_last_epoch() -> None:
    factors = [cosine_factor(e, 6, 2) for e in range(7)]
    assert factors[:3] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert factors[2:] == sorted(factors[2:], reverse=True)
    assert factors[6] == pytest.approx(0.0)


@pytest.mark.parametrize("scheduler", ["step", "cosine", "none"])
def test_a_schedule_resumed_from_its_state_continues_exactly(scheduler: str) -> None:
    def schedule():
        opt = make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], lr=0.1)
        return opt, make_scheduler(scheduler, opt, gamma=0.5, epochs=5, warmup_epochs=1)

    opt, sched = schedule()
    lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    opt, sched = schedule()
    for _ in range(2):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = schedule()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    resumed = lrs[:2]
    for _ in range(3):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == lrs


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optimizer", "adam"),
        ("scheduler", "linear"),
        ("augment", "heavy"),
        ("nesterov", True),
        ("label_smoothing", 1.0),
        ("augment_crop_scale", [0.8, 0.2]),
        ("augment_flip", 1.5),
    ],
)
def test_bad_values_are_one_line_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(PipelineError, match=f"config key '{key}'"):
        TrainConfig(**{key: value})


def test_nothing_but_the_factory_builds_a_model() -> None:
    src = Path(__file__).resolve().parents[1]
    builders = ("ConvNet(", "timm.create_model(")
    found = [
        str(path.relative_to(src))
        for folder in ("src", "bench")
        for path in (src / folder).rglob("*.py")
        if "models" not in path.relative_to(src).parts
        and any(b in path.read_text(encoding="utf-8") for b in builders)
    ]
    assert found == []
