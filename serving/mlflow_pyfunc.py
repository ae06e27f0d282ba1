"""MLflow pyfunc entry point for a trustrec artifact bundle (logged as models-from-code).

`mlflow.pyfunc.load_model("models:/trustrec@champion").predict({"user_id": ["u1", "u2"], "k": [10, 5]})`
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
        users = list(model_input["user_id"])
        ks = model_input.get("k", [10] * len(users))  # a column, like user_id (no signature needed)
        ks = [ks] * len(users) if isinstance(ks, int) else list(ks)
        return [self.recommender.recommend(str(user), k=int(k)) for user, k in zip(users, ks)]


mlflow.models.set_model(TrustrecPyfunc())
