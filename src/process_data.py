"""Validate the raw image-folder dataset and write compact arrays for training.

Usage (from the project root):
    python -u src/process_data.py log_dir=./logs
    python -u src/process_data.py raw_data_dir_path=/path/to/raw num_workers=4
    python -u src/process_data.py --cfg job          # print the config it would run with
Config: conf/process_data.yaml (keys: docs/configuration.md). Under DVC: `make
process-data` (values from params.yaml).
"""

from imgpipe.cli import run_stage
from imgpipe.config import ProcessDataConfig


def main(config: ProcessDataConfig) -> None:
    from imgpipe.data import process_dataset

    process_dataset(
        config.raw_data_dir_path,
        config.processed_data_dir_path,
        num_workers=config.num_workers,
        max_image_pixels=config.max_image_pixels,
        val_fraction=config.val_fraction,
        image_size=tuple(config.image_size) if config.image_size else None,
        image_mode=config.image_mode,
        unsupported_files=config.unsupported_files,
    )


if __name__ == "__main__":
    # Every output is written to a temp file and renamed: a stop anywhere is clean.
    run_stage("process_data", main, doc=__doc__, immediate=True)
