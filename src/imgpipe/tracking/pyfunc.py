"""The loader that an MLflow model logged by this project names in its ``MLmodel``
(``loader_module``): ``mlflow.pyfunc.load_model`` calls ``_load_pyfunc`` with the model's
``data/model.pt``, loaded with ``weights_only`` through ``imgpipe.inference``.

    model = mlflow.pyfunc.load_model("models:/digits-cnn@champion")
    model.predict(["new/cat.png", open("dog.jpg", "rb").read()])

``predict`` takes image files (paths: the extension names the decoder) or their bytes (the
content names it, among the supported formats), as a list, a pandas Series, or a DataFrame
with a ``path`` or ``image`` column; or a uint8 array (N, H, W, C) already in the model's
size and mode. It answers a DataFrame: ``prediction``, ``probability``, ``top_k`` (a list
of {class, probability}). Each image goes through the same decoding, conversion, resize
and normalisation as the training images did. Loading this way does not check the model's
file digests: ``imgpipe predict`` and ``imgpipe serve`` do (``tracking.model_files``).
"""

from __future__ import annotations

from typing import Any

TOP_K = 3


class ImageModel:
    def __init__(self, model_file: str) -> None:
        from imgpipe.inference import Classifier

        self.classifier = Classifier.load(model_file)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import numpy as np
        import pandas as pd

        k = int((params or {}).get("top_k", TOP_K))
        if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
            rows = model_input.reshape((-1, *self.classifier.row_shape))
        else:
            rows = np.stack([self._row(item) for item in _items(model_input)])
        answers = self.classifier.answers(self.classifier.probabilities(rows), k)
        return pd.DataFrame([a.as_json() for a in answers])

    def _row(self, item: Any) -> Any:
        if isinstance(item, bytes | bytearray | memoryview):
            return self.classifier.prepare_upload(bytes(item), None, "image")
        return self.classifier.prepare_file(str(item))


def _items(model_input: Any) -> list[Any]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = next((c for c in ("path", "image") if c in model_input), model_input.columns[0])
        return list(model_input[column])
    if isinstance(model_input, str | bytes):
        return [model_input]
    return list(model_input)


def _load_pyfunc(data_path: str) -> ImageModel:
    return ImageModel(data_path)
