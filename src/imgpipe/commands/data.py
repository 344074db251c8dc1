"""``imgpipe data``: the sample digits exported into the raw layout.

imgpipe data sample data/raw    # `make data` (when data/raw does not exist)
"""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """The project's data: the sample dataset."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
def sample(out_dir: str) -> None:
    """Export scikit-learn's handwritten digits into OUT_DIR as <split>/<label>/<file>.png."""
    from imgpipe.data.sample import export_sample_digits

    count = export_sample_digits(out_dir)
    print(f"wrote {count} sample digits to {out_dir}")
