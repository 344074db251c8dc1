"""Validate the raw image-folder dataset and write compact arrays for training.

Usage (from the project root):
    python -u src/process_data.py log_dir=./logs
    python -u src/process_data.py raw_data_dir_path=/path/to/raw num_workers=4
Config: conf/process_data.yaml. Under DVC: `make process-data` (values from params.yaml).
"""

import hydra
from omegaconf import DictConfig

from imgpipe.cli import guarded, run_entry
from imgpipe.config import ProcessDataConfig, to_schema
from imgpipe.data import process_dataset
from imgpipe.logs import setup_logging


@hydra.main(config_path="../conf", config_name="process_data")
def main(cfg: DictConfig) -> None:
    config = guarded(to_schema, ProcessDataConfig, cfg, "conf/process_data.yaml")
    setup_logging(config.log_dir)
    guarded(
        process_dataset,
        config.raw_data_dir_path,
        config.processed_data_dir_path,
        num_workers=config.num_workers,
        max_image_pixels=config.max_image_pixels,
        val_fraction=config.val_fraction,
        image_size=tuple(config.image_size) if config.image_size else None,
        image_mode=config.image_mode,
    )


if __name__ == "__main__":
    # Every output is written to a temp file and renamed: a stop anywhere is clean.
    run_entry(main, "process_data", ProcessDataConfig, immediate=True)
