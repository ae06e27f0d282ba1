"""The artifact bundle: the only contract between training and serving.

A bundle is a directory (ONNX user tower, item matrix, items, vocabularies, manifest.json).
Training writes one (`bundle.write`), training's offline evaluation and serving read it
(`bundle.locate`, `bundle.load`), and both score it the same way (`bundle.runtime`: the ONNX Runtime
session; `bundle.topk`: exact and FAISS top-k; `bundle.rerank`: MMR). `bundle.manifest` holds the
schema and its version.

Neither torch nor training/, serving/ or cli/ is imported here (tests/test_layout.py checks it):
reading and scoring a bundle needs numpy and ONNX Runtime (FAISS for an approximate index, MLflow
for a `models:/` URI, both imported only when used).
"""
