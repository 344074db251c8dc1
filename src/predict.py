"""Classify a folder of new images with a trained model: the predict stage.

Usage (from the project root):
    python -u src/predict.py                                   # data/raw/test, models/model.pt
    python -u src/predict.py predict_input=new/ predict_model=models:/digits-cnn@champion
    python -u src/predict.py --cfg job          # print the config it would run with
Config: conf/predict.yaml. Under DVC: `make predict` (values from params.yaml). The same as
`imgpipe predict`. Writes predictions/ (imgpipe.predict says what each file holds).
"""

from imgpipe.cli import run_stage
from imgpipe.config import PredictConfig


def main(config: PredictConfig) -> None:
    from imgpipe.predict import run_predict

    run_predict(config)


if __name__ == "__main__":
    # Every output is written into a temp folder renamed into place: a stop anywhere is clean.
    run_stage("predict", main, doc=__doc__, immediate=True)
