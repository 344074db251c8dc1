"""A trained network logged into the active MLflow run as an MLflow model: one way, shared by
training (``mlflow_run``) and ``imgpipe sync`` (a model logged after an outage)."""

from __future__ import annotations

from typing import Any


def log_pytorch_model(model: Any, example: Any) -> str:
    """``model`` into the active run as an MLflow model (mlflow.pytorch.load_model and
    mlflow.pyfunc.load_model load it); the logged model's id."""
    import mlflow
    import torch

    model = model.cpu().eval()
    # "pt2" (torch.export) loads without running pickled code; it traces with the example.
    # Explicit requirements: inferring them imports and inspects the whole env.
    # No serving-input validation: MLflow would load the model back and predict on the
    # example on every run; the project's tests load logged models through pyfunc and
    # predict instead. (MLflow also hands this keyword to the flavor's save: "pt2"
    # ignores it, "pickle" would not.)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example.cpu().numpy(),
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        validate_serving_input=False,
    )
    return info.model_id
