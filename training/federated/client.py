"""The Flower ClientApp: a client trains the global model on its own users and reports back.

Local training is the project's own: `epoch_batches` (users as examples, hidden history items as
targets) and `RetrievalTask.loss`, with a fresh Adam per round (plus the FedProx proximal term
when the server asks for one). A client replies with the model's float arrays and a few scalar
metrics; its interactions, user indices and side features never leave it.
"""
from __future__ import annotations

import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.content import ItemSide
from training.config import TaskConfig
from training.data import CSR, Context, UserBatch, epoch_batches, gather_rows, user_features
from training.federated.partition import ClientData, read_client_data
from training.model import TowerSpec, TwoTower
from training.task import RetrievalTask

CPU = torch.device("cpu")


@dataclass(frozen=True)
class ClientPlan:
    """Everything public a client needs besides its own data: the model spec, the item catalog,
    the training recipe and where its local storage lives."""

    spec: TowerSpec
    items: ItemSide
    rating_weighted: bool
    task: TaskConfig
    param_names: tuple[str, ...]  # state_dict order of the arrays exchanged with the server
    store: str  # folder of the clients' local data (`client-<partition id>.pkl`)
    lr: float
    weight_decay: float
    local_epochs: int
    local_batch_size: int
    history_dropout: float
    user_id_dropout: float
    demographics_dropout: float
    stated_dropout: float
    item_id_dropout: float
    seed: int
    uniform_weights: bool  # client-level DP: every client weighs 1 (the noise is calibrated to C/m)
    dp: bool = False
    secagg: bool = False
    audit_dir: str | None = None
    optimizer: str = "adam"  # federated.client_optimizer (lr above: federated.client_lr or trainer.lr)


def get_weights(model: TwoTower) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: TwoTower, names: tuple[str, ...], arrays: list[np.ndarray]) -> None:
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} weight arrays, got {len(arrays)}")
    model.load_state_dict({n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)})


def proximal_term(model: TwoTower, anchor: list[torch.Tensor]) -> torch.Tensor:
    """FedProx: 1/2 ||w - w_global||^2 over every parameter."""
    return 0.5 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))


def local_train(model: TwoTower, task: RetrievalTask, ctx: Context, train: CSR, plan: ClientPlan, rng: np.random.Generator, mu: float = 0.0) -> tuple[float, int]:
    """`plan.local_epochs` passes over the client's users; returns (mean task loss, steps)."""
    model.train()
    if plan.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    total, steps = 0.0, 0
    for _ in range(plan.local_epochs):
        batches = epoch_batches(
            model.spec, ctx, train, plan.local_batch_size, plan.history_dropout, plan.user_id_dropout, rng, CPU,
            plan.demographics_dropout, plan.stated_dropout,
        )  # fmt: skip
        for batch in batches:
            loss = task.loss(model, batch, ctx)
            objective = loss + mu * proximal_term(model, anchor) if anchor is not None else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1), steps


def evaluation_batch(spec: TowerSpec, ctx: Context, users: np.ndarray, history: CSR, truth: CSR) -> UserBatch:
    """The users' full history as input, their held-out items as targets (for a validation loss)."""
    lengths, items = gather_rows(truth, users)
    return UserBatch(users, user_features(spec, ctx, users, history, CPU), (np.concatenate([[0], np.cumsum(lengths)]), items))


class RecClient:
    """Flower NumPyClient over one partition (built per message by `client_fn`)."""

    def __init__(self, plan: ClientPlan, data: ClientData, partition_id: int):
        self.plan, self.data, self.pid = plan, data, partition_id
        self.ctx = Context(data.user_side, plan.items, plan.rating_weighted)
        self.train, self.val = data.train, data.val  # full-height views of the client's own rows

    def _model(self, parameters: list[np.ndarray]) -> TwoTower:
        model = TwoTower(self.plan.spec, device=CPU)
        set_weights(model, self.plan.param_names, parameters)
        return model

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        torch.set_num_threads(1)  # one actor per core
        server_round = int(config.get("server_round", 0))
        seed = [self.plan.seed, server_round, self.pid]
        rng = np.random.default_rng(seed)
        np.random.seed(np.random.SeedSequence(seed).generate_state(1))  # the task's id-dropout draws
        torch.manual_seed(int(rng.integers(2**31)))
        model = self._model(parameters)
        # the task only sees this client's counts (its logQ prior); the full-softmax loss ignores them
        counts = np.bincount(self.train[1], minlength=self.plan.spec.n_items).astype(np.float64)
        task = RetrievalTask(self.plan.task, counts, self.plan.item_id_dropout)
        loss, steps = local_train(model, task, self.ctx, self.train, self.plan, rng, float(config.get("proximal_mu", 0.0)))
        n_users = int((np.diff(self.train[0]) > 0).sum())
        return get_weights(model), 1 if self.plan.uniform_weights else n_users, {"train_loss": float(loss), "local_steps": int(steps)}

    @torch.no_grad()
    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        """Validation of the global model on this client's users: per-user means weighted by
        the number of users, so the server's weighted average equals the global mean."""
        torch.set_num_threads(1)
        model = self._model(parameters)
        model.eval()
        users = self.data.users[np.diff(self.val[0])[self.data.users] > 0]
        if len(users) == 0:
            return 0.0, 0, {}
        task = RetrievalTask(self.plan.task, np.ones(self.plan.spec.n_items))  # no item is 'cold' to a client
        loss = float(task.loss(model, evaluation_batch(model.spec, self.ctx, users, self.train, self.val), self.ctx))
        metrics = task.metrics(model, self.train, self.val, self.ctx, CPU, users)
        metrics.pop("coverage", None)  # a catalog-level figure: an average over clients would be wrong
        return loss, len(users), {"loss": loss, **{k: float(v) for k, v in metrics.items()}}


class AuditMod:
    """Client mod (outermost) that pickles every message a client sends, exactly as it leaves
    (after clipping and SecAgg+ masking), into `folder` for review (`federated.audit_dir`)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, msg, ctxt, call_next):
        out = call_next(msg, ctxt)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        rounds = [c["server_round"] for c in msg.content.config_records.values() if "server_round" in c]
        server_round = int(rounds[0]) if rounds else 0  # SecAgg+ key-exchange stages carry none
        record = {"message_type": out.metadata.message_type, "server_round": server_round, "content": out.content if out.has_content() else None}
        path = Path(self.folder) / f"{out.metadata.message_type}-r{server_round}-{uuid.uuid4().hex}.pkl"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(record))
        tmp.replace(path)
        return out


def make_client_app(plan: ClientPlan):
    """ClientApp whose `client_fn(context)` loads only its own partition from local storage."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod

    class _Client(NumPyClient):
        """A Flower node. One node per client: it always plays its own partition. Poisson
        sampling: the node is a device slot, and the server names in each message which
        client it plays (`client`); it then loads that client's storage, nothing else."""

        def __init__(self, node_pid: int):
            self.node_pid = node_pid

        def _inner(self, config) -> RecClient:
            pid = int(config.get("client", self.node_pid))
            return RecClient(plan, read_client_data(plan.store, pid), pid)

        def fit(self, parameters, config):
            return self._inner(config).fit(parameters, config)

        def evaluate(self, parameters, config):
            return self._inner(config).evaluate(parameters, config)

    def client_fn(context):
        return _Client(int(context.node_config["partition-id"])).to_client()

    # mods[0] is outermost: the audit sees what really leaves; clipping runs before SecAgg+ masks
    mods = [AuditMod(plan.audit_dir)] if plan.audit_dir else []
    mods += [secaggplus_mod] if plan.secagg else []
    mods += [fixedclipping_mod] if plan.dp else []
    return ClientApp(client_fn=client_fn, mods=mods)
