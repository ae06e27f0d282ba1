"""MLflow pyfunc entry point for a trustrec artifact bundle (logged as models-from-code).

`mlflow.pyfunc.load_model("models:/trustrec@champion").predict({"user_id": [...], "k": 10})`
returns recommendations without Ray. The bundle itself (ONNX + item matrix + manifest) is
the model's `bundle` artifact; `serving.recommender` reads it directly too.
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TrustrecPyfunc(PythonModel):
    def load_context(self, context):
        from serving.recommender import Recommender

        self.recommender = Recommender.from_dir(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_dict"):  # pandas DataFrame
            model_input = model_input.to_dict(orient="list")
        k = int((params or {}).get("k", 10))
        return [self.recommender.recommend(str(user), k=k) for user in model_input["user_id"]]


mlflow.models.set_model(TrustrecPyfunc())
