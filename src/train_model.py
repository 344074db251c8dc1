"""Train the CNN on the processed data, tracked in MLflow and dvclive.

Usage (from the project root):
    python -u src/train_model.py
    python -u src/train_model.py lr=1.5 epochs=5
    python -u src/train_model.py mlflow_tracking_uri=http://127.0.0.1:5000 log_dir=./logs
    python -u src/train_model.py resume=true epochs=20      # continue / extend the last run
    python -u src/train_model.py --multirun                  # Optuna sweep (conf/train_model.yaml)
    python -u src/train_model.py --cfg job                   # print the config it would run with
Config: conf/train_model.yaml (keys: docs/configuration.md). Under DVC: `make train` and
`make sweep` (values from params.yaml). The sweep is the project's own loop over the
config's ``hydra.sweeper`` block (see imgpipe.sweep).
"""

from imgpipe.cli import run_stage
from imgpipe.config import TrainConfig


def main(config: TrainConfig) -> None:
    from imgpipe.train import train  # torch loads only once the config is known good

    train(config)


def sweep(argv: list[str]) -> None:
    """``--multirun``: an Optuna sweep over the config's ``hydra.sweeper`` block."""
    from imgpipe.sweep import main as run_sweep_command

    run_sweep_command("train_model", argv)


if __name__ == "__main__":
    run_stage("train_model", main, doc=__doc__, sweep=sweep)
