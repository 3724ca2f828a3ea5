"""The MLflow model of a trained student: this file *is* the model's code (MLflow "models from
code"), copied into every logged ``student`` model and run by ``mlflow.pyfunc.load_model``.

What a logged student holds (see :func:`orchestrator.registry.log_student`):

- ``weights.safetensors``: the state dict, read without pickle;
- ``student.json``: ``{"arch", "num_classes", "input_size", "channels"}``, enough for
  ``trainables.models.build_model`` to rebuild the module;
- ``code/trainables/models.py``: the architectures, so the model also loads where e2kd is not
  installed (an installed ``trainables`` is used first when it is already imported).

Nothing in the artifact is unpickled: loading runs this file and the project's ``models.py``,
both readable in the artifact. ``load_model(uri).unwrap_python_model().model`` is the
``torch.nn.Module`` (GradCAM and B-cos explanations need the module, not a traced graph).
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Student(PythonModel):
    """``predict``: float32 images [N, C, H, W] (normalised as in training) -> logits [N, classes]."""

    # The logged signature (tensor specs) describes the input; MLflow's type-hint checks would only
    # warn on every sweep that predict has none.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from trainables.models import build_model

        with open(context.artifacts["config"]) as f:
            self.config = json.load(f)
        # build_model reads .safetensors with safetensors' loader (no pickle) and checks the keys.
        self.model = build_model(self.config["arch"], self.config["num_classes"],
                                 weights=context.artifacts["weights"]).eval()

    def predict(self, context, model_input, params=None):
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(Student())
