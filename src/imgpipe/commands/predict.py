"""``imgpipe predict`` and ``imgpipe serve``: a folder of images classified, and the model
behind HTTP (conf/predict.yaml; key=value overrides as for the stages).

    imgpipe predict                                   # `make predict`: data/raw/test with models/model.pt
    imgpipe predict predict_input=new/ predict_model=models:/digits-cnn@champion
    imgpipe serve serve_model=models/model.pt serve_port=9000    # `make serve`
"""

from __future__ import annotations

import click

OVERRIDES = click.argument("overrides", nargs=-1)


@click.command(context_settings={"ignore_unknown_options": True})
@OVERRIDES
def predict(overrides: tuple[str, ...]) -> None:
    """Classify a folder of images (predict_input) with predict_model -> predictions/."""
    from imgpipe.cli import run_stage

    def run(cfg: object) -> None:
        from imgpipe.predict import run_predict

        run_predict(cfg)

    run_stage("predict", run, doc=__doc__, immediate=True, argv=list(overrides))


@click.command(context_settings={"ignore_unknown_options": True})
@OVERRIDES
def serve(overrides: tuple[str, ...]) -> None:
    """Serve the model over HTTP: POST /predict, GET /health, /ready, /model."""
    from imgpipe.cli import run_stage

    def run(cfg: object) -> None:
        from imgpipe.serve import run_serve

        run_serve(cfg)

    run_stage("predict", run, doc=__doc__, immediate=True, argv=list(overrides))
