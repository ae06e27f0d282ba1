"""Federated training with Flower (privacy.mode: federated).

Users are partitioned into clients (one user per client, or N silos); a client keeps its users'
interactions and side features on its own storage and sends only model weights and scalar
metrics. The server aggregates with a Flower strategy (FedAvg, FedAdam, FedProx), optionally with
client-level DP (fixed clipping + Gaussian noise) and SecAgg+ secure aggregation. Or, with
`federated.strategy: gram`, each client sends its users' item Gram part once and the server fits
EASE on the sum (optionally DP-released by the server).

- partition.py  which users each client holds; the per-client data (nothing of other users)
- client.py     the ClientApp: local training with the project's task loss and batching
- server.py     the ServerApp: strategy, DP wrapper, SecAgg+ workflow, per-round bookkeeping
- fit.py        `fit_federated`: runs the Flower simulation (Ray backend) for the pipeline
- gram.py       federated EASE: the clients' Gram parts, the summing strategy, `fit_federated_gram`
"""
