"""Federated training with Flower (privacy.mode: federated).

Users are partitioned into clients (one user per client, or N silos); a client keeps its users'
interactions and side features on its own storage and sends only model weights and scalar
metrics. The server aggregates with a Flower strategy (FedAvg, FedAdam, FedProx), optionally with
client-level DP (fixed clipping + Gaussian noise) and SecAgg+ secure aggregation.

- partition.py  which users each client holds; the per-client data (nothing of other users)
- client.py     the ClientApp: local training with the project's task loss and batching
- server.py     the ServerApp: strategy, DP wrapper, SecAgg+ workflow, per-round bookkeeping
- fit.py        `fit_federated`: runs the Flower simulation (Ray backend) for the pipeline
"""
