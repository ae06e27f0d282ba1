"""Run configuration: one pydantic tree, loaded from YAML with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo fails loudly with its dotted name instead of
silently training with a default.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from features.config import DataConfig, SplitConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    kind: Literal["two_tower", "hybrid"] = "two_tower"  # a label: the switches below make the difference
    embedding_dim: int = Field(64, gt=0)
    hidden_dim: int = Field(128, gt=0)
    output_dim: int = Field(64, gt=0)
    # ReLU layers in each tower's MLP; 0 = one linear map (ML-100k: 0.4568 vs 0.4457 NDCG@10, same run otherwise)
    hidden_layers: int = Field(1, ge=0)
    use_user_id: bool = False
    user_id_dropout: float = Field(0.1, ge=0, le=1)
    use_genres: bool = True
    temperature: float = Field(0.05, gt=0)
    # hybrid switches
    use_content: bool = False
    # with use_content: hashed title tokens. Nearly unique per film, they act as a second item id:
    # never-seen items then score from untrained rows (ML-100k item cold start 0.12 with vs 0.24 without)
    use_title: bool = True
    use_demographics: bool = False
    use_stated: bool = False
    rating_weighted: bool = False
    item_id_dropout: float = Field(0.0, ge=0, lt=1)
    demographics_dropout: float = Field(0.2, ge=0, le=1)
    stated_dropout: float = Field(0.5, ge=0, le=1)
    title_buckets: int = Field(1024, gt=0)
    # release-year buckets of the content path: "decade" or "year" (one per year). ML-100k's films
    # are 80 % 1990s, one decade bucket: item cold start NDCG@10 0.2663 (year) vs 0.2087 (decade)
    year_buckets: Literal["decade", "year"] = "decade"
    # a learned per-item logit bias, exported as one more vector coordinate (user 1, item b); off by
    # default (the non-private recipes were measured without); on in the DP recipe: eps 1 0.1785 vs 0.1367
    item_bias: bool = False


class TaskConfig(_Section):
    loss: Literal["auto", "full_softmax", "sampled_softmax"] = "auto"
    full_softmax_max_items: int = Field(50_000, gt=0)
    history_dropout: float = Field(0.3, gt=0, lt=1)
    # full softmax: "user" = each user's hidden items averaged, then users (each user counts once);
    # "item" = every hidden item of the batch counts once (heavy users weigh more, as in Mult-VAE)
    loss_weighting: Literal["user", "item"] = "user"
    eval_k: int = Field(10, gt=0)


class TrainerConfig(_Section):
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # constant, or cosine decay over `epochs` (the epoch-to-epoch noise of a constant lr is ~0.02 NDCG)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    patience: int = Field(10, gt=0)
    # a validation epoch resets `patience` only when it beats the value at the last such reset by this
    # relative margin (0.005: +0.5 %); smaller gains still keep their weights (the best epoch is always
    # kept) but no longer keep training alive. 0: any gain resets patience (the old rule, under which
    # ML-1M implicit crept on by 0.1 % steps to epoch 50 of 100). See configs/two_tower.yaml.
    min_delta: float = Field(0.0, ge=0, lt=1)
    # wall-clock budget of the validated fit, seconds: the epoch that crosses it is the last (its
    # weights count like any other's). null: no budget. The refit on train + val is not cut short.
    max_seconds: float | None = Field(None, gt=0)
    # after early stopping, retrain from the same init on train + val for the chosen epoch count,
    # so the final model loses none of the data validation held out
    refit: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    checkpoint_dir: str = "runs/checkpoints"
    num_threads: int | None = Field(None, gt=0)
    progress: bool = True
    # torch.compile the towers' dense MLPs for the fit (the TorchRec bag lookups stay eager: their
    # jagged KJT ops break the graph). Off by default: on cpu-2c (train_throughput.py, 10k x 3k, 30-step
    # epochs, 3 interleaved rounds under load 7) compiled / eager users/s was 0.94x, 2.1x, 1.08x, inside
    # the load's noise, for a cold compile per process; a GPU's gain is what scripts/gpu_check.sh measures
    compile: bool = False
    # torch.compile's mode with compile: true. reduce-overhead adds CUDA graphs (Inductor's cudagraph
    # trees: a step's MLP kernels replayed as one launch; nothing on the CPU), max-autotune tunes the
    # kernels (long compiles). default: no measured case for the others yet (scripts/gpu_check.sh
    # times reduce-overhead against default)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    # epoch batches built with torch ops on the training device (the epoch's CSR uploaded once, no
    # numpy and no host sync per step) instead of numpy on the host; history + user id + demographics
    # features (stated genres keep the numpy path). null: on CUDA only; on the CPU both are host work
    # (cpu-2c, same runs as compile: 0.95x, 1.11x, 1.19x the numpy path's users/s, inside the noise)
    device_batches: bool | None = None
    # cap on the steps of every epoch (null: the whole epoch): for throughput runs at 1M users that
    # must fit a time budget (scripts/gpu_check.sh), not for real fits
    steps_per_epoch: int | None = Field(None, gt=0)


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "trustrec"
    run_name: str | None = None
    register_model: bool = True
    registered_model: str = "trustrec"
    alias: str = "champion"
    artifact_location: str | None = None  # where a new experiment keeps run artifacts; None: beside a sqlite database


class ExportConfig(_Section):
    output_dir: str = "artifacts/two_tower"
    parity_atol: float = Field(1e-5, gt=0)
    popularity_top_n: int = Field(100, gt=0)


class StoreConfig(_Section):
    url: str = "sqlite:///data/features.db"
    load: bool = True


class PrivacyConfig(_Section):
    """How the customers behind the training data are protected (issue 4 fills in the knobs)."""

    # none: central training; dp: user-level DP-SGD (Opacus, training/privacy/);
    # federated: Flower simulation, data stays with its client (training/federated/)
    mode: Literal["none", "dp", "federated"] = "none"
    # --- dp: which private model. dp_sgd: the two-tower trained by user-level DP-SGD (below);
    # gram: DP-EASE (training/privacy/gram.py), one analytic-Gaussian release of the item Gram
    # matrix of unit-norm user histories (sensitivity 1), EASE on it; no epochs, no torch tower
    mechanism: Literal["dp_sgd", "gram"] = "dp_sgd"
    # gram: EASE's lambda; null: the rule below (public constants only, reads no data)
    gram_lambda: float | None = Field(None, gt=0)
    # gram, gram_lambda null: lambda = factor * sigma * sqrt(2 * n_items) (noise: the noise matrix's spectral
    # norm; factor 1 was the default before issue 17) or factor * rho * sigma * sqrt(2 * n_items) with
    # rho = sigma * n_items / members (noise_snr: the released diagonal's noise-to-signal ratio, so small
    # epsilons and small user bases regularise harder). Chosen on validation only, factor on ML-100k
    # (figures: training/privacy/gram.py's docstring)
    gram_lambda_rule: Literal["noise", "noise_snr"] = "noise_snr"
    gram_lambda_factor: float = Field(2.7, gt=0)
    # gram, gram_lambda null: the rule's lambda is raised to at least floor * members / n_items (floor times the
    # Gram's mean diagonal), where EASE on the noiseless unit-row Gram is at its best: validation, c = 8 best on
    # ML-1M, c = 16 on ML-100k (-1.4 % at 8). Binds only for user bases much larger than the catalog (the noise
    # rule's lambda falls as 1/members); 0: no floor
    gram_lambda_floor: float = Field(8.0, ge=0)
    # gram: weight mu of the popularity prior added to the released Gram before EASE (post-processing:
    # mu * r r^T / sum r, r = the release's row sums); null: mu = max(0, rho - 3) / 2 (public constants
    # only: 0 at eps >= 2 on ML-100k and ML-1M, 1.28 at eps 1 on ML-100k); 0: no prior. Chosen on validation
    gram_prior_weight: float | None = Field(None, ge=0)
    # gram: share f of the budget spent on a second statistic released with the Gram, the popularity vector
    # sum of unit-norm histories (1/sigma_gram^2 = (1 - f)/sigma^2, 1/sigma_pop^2 = f/sigma^2: the same
    # (epsilon, delta)); the fallback list and the prior then read both. null: f = min(0.3, max(0, (rho - 3) / 10))
    # (public constants only: 0 on ML-1M at eps >= 1 and on ML-100k at eps >= 2, 0.26 at eps 1 on ML-100k);
    # 0: the Gram only. Chosen on validation (training/privacy/gram.py's docstring)
    gram_popularity_share: float | None = Field(None, ge=0, lt=1)
    # gram: power beta of the item weights w = clip(v~ / max v~, 0.01, 1)^beta applied to every history before
    # the unit-norm clip (v~ the popularity vector, released first; the served user vector reads x * w). Where
    # the noise is large, popular items' pairs get more of each user's unit norm. null: beta = 0.25 where
    # rho >= 2 (rho = sigma * n_items / members; public constants only), else 0; with beta > 0 the popularity
    # share is at least 0.05. 0: unweighted. Chosen on validation (training/privacy/gram.py's docstring)
    gram_weight_power: float | None = Field(None, ge=0, le=2)
    # gram: rank of the served vectors (B factored by its own subspace); null: exact, n_items coordinates
    gram_rank: int | None = Field(None, gt=0)
    # --- dp: user-level DP-SGD (one example = one user; Poisson sampling, per-user clipping, noise).
    # trainer.batch_size is the EXPECTED number of users per step (sample rate = batch_size / users),
    # trainer.epochs the number of expected passes; DP takes the last model (no early stopping on
    # private validation data, whose choice the accountant would not cover)
    target_epsilon: float | None = Field(8.0, gt=0)  # 8: the usual "meaningful" upper end; null to give sigma
    noise_multiplier: float | None = Field(None, ge=0)  # sigma instead of a target epsilon (then target_epsilon: null)
    delta: float | None = Field(None, gt=0, lt=1)  # null: 1 / training users (the default); lower is stricter
    max_grad_norm: float = Field(1.0, gt=0)  # C: L2 bound of one user's whole gradient
    accountant: Literal["rdp", "prv"] = "rdp"  # rdp: Opacus' default; prv: tighter epsilon for the same sigma
    # --- membership-inference audit (`trustrec audit privacy RUN_ID`): this share of users (seeded) is
    # held out of train AND val AND test entirely, as the audit's non-members; 0 = no audit possible
    audit_holdout: float = Field(0.0, ge=0, lt=1)
    audit_seed: int = 0  # same seed, same non-members, so runs under different privacy modes compare
    # --- the privacy-budget ledger (features/privacy_ledger.py), in the feature store at store.url:
    # every private release (dp, or federated with federated.dp) is recorded there, and a training
    # that would take any of its users past total_epsilon (composed over the releases that covered
    # them) is refused before it releases anything. null: no limit (the releases are still recorded)
    total_epsilon: float | None = Field(None, gt=0)
    ledger: bool = True  # false: record nothing (benchmarks and throwaway experiments; then no limit is enforced)

    @model_validator(mode="after")
    def _one_noise_setting(self) -> "PrivacyConfig":
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("privacy.noise_multiplier: give target_epsilon or noise_multiplier, not both (set privacy.target_epsilon: null)")
        if self.mode == "dp" and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("privacy.target_epsilon: dp mode needs target_epsilon or noise_multiplier")
        if self.total_epsilon is not None and not self.ledger:
            raise ValueError("privacy.total_epsilon: a budget needs the ledger that enforces it (privacy.ledger: true)")
        if self.mechanism == "gram" and self.mode != "dp":
            raise ValueError(f"privacy.mechanism: gram is a dp mechanism (privacy.mode: dp), not with privacy.mode {self.mode}")
        if self.mode == "dp" and self.mechanism == "gram":
            if self.target_epsilon is not None and not math.isfinite(self.target_epsilon):
                raise ValueError("privacy.target_epsilon: the gram mechanism needs a finite epsilon (privacy.mode: none trains without privacy)")
            if self.target_epsilon is None and self.noise_multiplier == 0:
                raise ValueError("privacy.noise_multiplier: the gram mechanism needs sigma > 0 (privacy.mode: none trains without privacy)")
        return self


class FederatedConfig(_Section):
    """Flower settings, read when privacy.mode is federated."""

    # silos: users split at random into n_silos clients (e.g. regional shards); user: one user per
    # client (cross-device, a phone per customer). Silos converge in far fewer rounds.
    partition: Literal["silos", "user"] = "silos"
    n_silos: int = Field(10, ge=2)  # enough clients for averaging to matter, few enough for 2 CPUs
    partition_seed: int = 0  # same seed, same users per client, so runs are comparable
    rounds: int = Field(100, gt=0)  # an upper bound (the budget); patience usually ends sooner
    patience: int = Field(15, gt=0)  # rounds without a federated val NDCG gain before stopping
    fraction_fit: float = Field(1.0, gt=0, le=1)  # silos: all train every round; cross-device: ~0.1
    fraction_evaluate: float = Field(1.0, gt=0, le=1)  # share of clients reporting val metrics per round
    min_clients: int = Field(2, ge=1)  # Flower waits for at least this many clients per round
    local_epochs: int = Field(3, gt=0)  # passes over the client's users per round: fewer rounds, more drift
    local_batch_size: int = Field(32, gt=0)  # users per local step; a silo holds ~100 users, so a few steps
    # gram: federated EASE (training/federated/gram.py): each client sends its users' item Gram part once,
    # the server sums (adding DP noise with dp) and fits EASE; rounds = ceil(clients / clients per round)
    strategy: Literal["fedavg", "fedadam", "fedprox", "gram"] = "fedavg"  # plain averaging is the baseline
    # gram without dp and without privacy.gram_lambda: EASE's lambda chosen on validation over these (the
    # peers' EASE grid span: ML-100k chose 600, ML-1M implicit 1,600)
    gram_lambdas: list[float] = Field(default_factory=lambda: [50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0])
    proximal_mu: float = Field(0.01, ge=0)  # fedprox: pull local weights back to the global ones
    server_lr: float = Field(0.01, gt=0)  # fedadam: server-side Adam step on the averaged update
    # the clients' local optimizer. adam (fresh each round, at trainer.lr): what the silos use. sgd: a
    # client's update is its (summed) gradient, so the server's average is a true minibatch gradient;
    # a fresh Adam's first step is lr * sign(g) for every weight with any gradient (every item row
    # under the full softmax), which averages one-user clients into noise (ML-1M: FedAdam val NDCG@10
    # 0.068 after 30 rounds with adam clients)
    client_optimizer: Literal["adam", "sgd"] = "adam"
    client_lr: float | None = Field(None, gt=0)  # null: trainer.lr
    # client-level DP (Flower's DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod):
    # every client's update is clipped to clipping_norm and the server adds N(0, (sigma*C/m)^2)
    dp: bool = False
    noise_multiplier: float = Field(1.0, gt=0)  # sigma; >= 1 is what gives a meaningful epsilon
    clipping_norm: float = Field(1.0, gt=0)  # C: L2 bound of one client's update (whole model)
    dp_delta: float | None = Field(None, gt=0, lt=1)  # null: 1 / number of clients
    # secure aggregation (Flower's SecAggPlusWorkflow + secaggplus_mod): the server only sees the sum
    secagg: bool = False
    secagg_num_shares: int = Field(3, ge=3)  # key shares per client; more survive more dropouts
    secagg_reconstruction_threshold: int = Field(2, ge=2)  # shares needed to unmask a dropped client
    secagg_clipping_range: float = Field(8.0, gt=0)  # weights are clipped to +-range before quantizing
    # Ray backend of the simulation
    num_cpus_per_client: float = Field(1.0, gt=0)  # one actor per core: torch inside uses one thread
    ray_num_cpus: int | None = Field(None, gt=0)  # null: all cores; tests pass 2
    progress: bool = True  # tqdm bar per round
    audit_dir: str | None = None  # null: off; else every message a client sends is pickled here for review
    # flower: one Flower node per client, Flower samples fraction_fit of them (a fixed number) per round;
    # fine for silos, but Flower's in-memory simulation scans every node for every pending message,
    # so 6,040 nodes cost ~26 s a round of 120 clients (ML-1M, 2 cores). poisson: each client joins a
    # round independently with probability fraction_fit (the sampling the subsampled-Gaussian accountant
    # assumes, so client-level DP gets amplification by sampling); the simulation runs on a few "device
    # slots" that play the round's sampled clients, and evaluation must be server-side
    sampling: Literal["flower", "poisson"] = "flower"
    # clients: sampled clients report val metrics on their own users (fraction_evaluate); server: the
    # global model is scored on the validation split of every user every eval_every rounds (a simulation
    # convenience: one batched pass instead of thousands of one-user messages)
    evaluation: Literal["clients", "server"] = "clients"
    eval_every: int = Field(1, gt=0)  # rounds between server-side evaluations (the last round always is one)
    # wall-clock budget of the rounds (null: none): the run stops after the first evaluated round past it
    # (with dp, epsilon is then accounted for the rounds run, below the target set for `rounds`)
    max_minutes: float | None = Field(None, gt=0)
    # with dp: the noise multiplier that gives this epsilon after `rounds` rounds at delta (RDP accountant,
    # with sampling amplification under poisson); null: noise_multiplier as set
    target_epsilon: float | None = Field(None, gt=0)


class DistributedConfig(_Section):
    """TorchRec sharding across processes, read by `trustrec train --distributed N`."""

    # processes (one per GPU on a CUDA host); `--distributed N` overrides it. 2: the smallest run
    # that exercises every collective, and what a 2-core CPU host can hold
    world_size: int = Field(2, ge=1)
    # torchrun: N processes on this host; ray: Ray Train's TorchTrainer, the way onto several nodes
    launcher: Literal["torchrun", "ray"] = "torchrun"
    # auto: nccl when the processes train on CUDA, gloo on CPU (nccl has no CPU tensors)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # sharding types the planner may choose from; null: the legal set for the device (CPU:
    # table_wise / column_wise / data_parallel, as TorchRec's CPU kernels allow; GPU adds row_wise)
    sharding_types: list[Literal["data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise"]] | None = None
    # optimizer fused into the backward of model-parallel tables (FBGEMM). auto: adam on GPU (what the
    # dense parts use), exact adagrad on CPU (FBGEMM's CPU kernels offer no Adam); data-parallel
    # tables and the MLPs always use the trainer's Adam
    embedding_optimizer: Literal["auto", "adam", "adagrad", "rowwise_adagrad", "sgd"] = "auto"
    embedding_lr: float | None = Field(None, gt=0)  # null: trainer.lr (one learning rate to tune)
    # memory: the config's in-memory dataset; every rank draws the same global batches and keeps its
    # slice (exactly a single-process run at any world size). shards: stream Parquet shards written
    # by `features.shards`, each rank reading its own files (data bigger than one host's memory)
    data: Literal["memory", "shards"] = "memory"
    shards_path: str | None = None  # the directory `features.shards.write_shards` wrote
    read_batch_rows: int = Field(65_536, gt=0)  # Parquet rows per record batch: bounds reader memory
    # ray only: address of an existing cluster (null: start a local one); CPUs per worker
    ray_address: str | None = None
    cpus_per_worker: int = Field(1, gt=0)
    # seconds a rank waits at a collective before failing, instead of hanging on a dead peer
    timeout_s: int = Field(600, gt=0)


class BlendConfig(_Section):
    """An EASE item-item model added to the trained two-tower (training/blend.py), served as one
    dot product: EASE on the `head_items` most popular items, factored to `rank`, the two-tower alone
    on the rest. ML-100k: 0.4960 vs 0.4737 NDCG@10 (configs/two_tower_ease_ml100k.yaml); off by default."""

    ease: bool = False
    # (weight of the two-tower, EASE's lambda) are chosen on validation over these grids; ML-100k
    # chose 0.9 and 400-600 on every seed
    weights: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(21)])
    lambdas: list[float] = Field(default_factory=lambda: [100.0, 200.0, 400.0, 600.0, 800.0])
    # EASE's rank in the served vectors: item vectors grow by this many coordinates, the user tower by
    # (head_items + 1) x rank floats (10k items: 10 MB + 10 MB). 256: ML-1M implicit (3,706 items, EASE
    # alone, lambda 500) NDCG@10 0.3675 vs 0.3617 exact (the subspace of the users' EASE scores
    # denoises) and 0.3596 for B's plain SVD; 128: 0.3653, 512: 0.3611. null: B exact (head_items wide)
    rank: int | None = Field(256, gt=0)
    # EASE's items: the most popular ones, up to this many; the rest get the two-tower's score only.
    # A memory budget: EASE inverts one dense head x head float64 matrix in place (10k: 0.8 GB, ~1 min
    # a lambda on 2 busy cores; time grows as head³)
    head_items: int = Field(10_000, gt=0)
    # α grid: each genre enters EASE's Gram as a pseudo-user of weight α who rated the genre's items
    # (collective EASE; training/blend.py), chosen on validation with (weight, lambda); 0 is plain EASE,
    # and data without genres only ever gets 0. [0]: off (each extra α adds one inversion per lambda)
    genre_weights: list[float] = Field(default_factory=lambda: [0.0])

    @model_validator(mode="after")
    def _grids(self) -> "BlendConfig":
        if not self.weights or any(not 0 <= a <= 1 for a in self.weights):
            raise ValueError("blend.weights: a non-empty list of two-tower weights in [0, 1]")
        if not self.lambdas or any(lam <= 0 for lam in self.lambdas):
            raise ValueError("blend.lambdas: a non-empty list of positive regularisation strengths")
        if not self.genre_weights or any(not (a >= 0 and math.isfinite(a)) for a in self.genre_weights):
            raise ValueError("blend.genre_weights: a non-empty list of finite genre weights >= 0 (0: plain EASE)")
        return self


class SearchConfig(_Section):
    """The two-tower's data-dependent settings chosen on validation by successive halving within a
    time budget (training/search.py), before the usual fit. Off by default (the demo recipe stays a
    quick single fit); on in configs/two_tower_ease.yaml, the recipe for a dataset you bring."""

    enabled: bool = False
    # dotted config keys -> candidate values: every combination is a candidate. The default grid holds
    # the three settings that moved ML-100k most (docs/BENCHMARKS.md): linear vs MLP towers (+0.011),
    # history dropout 0.7 vs 0.3 (+0.024), temperature (flat on ML-100k, data-dependent elsewhere)
    space: dict[str, list[Any]] = Field(default_factory=lambda: {
        "model.hidden_layers": [0, 1], "task.history_dropout": [0.3, 0.7], "model.temperature": [0.05, 0.1]})  # fmt: skip
    min_epochs: int = Field(4, gt=0)  # epochs of the first rung; each later rung multiplies them by eta
    eta: int = Field(2, ge=2)  # keep the best 1/eta of the candidates per rung
    # wall-clock budget of the whole search, s; a rung that would not fit (estimated from the last
    # one's seconds per epoch) is not started. 900 s: the three rungs of the default grid on ML-1M
    # implicit (~7.5 s an epoch on 2 cores)
    budget_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _space(self) -> "SearchConfig":
        if not self.space or any(not isinstance(v, list) or not v for v in self.space.values()):
            raise ValueError("search.space: a non-empty mapping of dotted config keys to non-empty lists of values")
        return self


class TrainConfig(_Section):
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: ExportConfig = ExportConfig()
    store: StoreConfig = StoreConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federated: FederatedConfig = FederatedConfig()
    distributed: DistributedConfig = DistributedConfig()
    blend: BlendConfig = BlendConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _blend_is_central(self) -> "TrainConfig":
        if self.blend.ease and self.privacy.mode != "none":
            # EASE is fitted on the raw interactions, outside DP's accountant and the federated clients
            raise ValueError(f"blend.ease: not with privacy.mode {self.privacy.mode} (EASE reads the raw interactions)")
        if self.search.enabled and self.privacy.mode != "none":
            # choosing settings by validation scores reads the data outside the accountant and the clients
            raise ValueError(f"search.enabled: not with privacy.mode {self.privacy.mode} (the search reads validation outside the privacy guarantee)")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config problem, always naming the dotted key (and the file) at fault."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` in place; the value is parsed as YAML (so 3, 0.1, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in error.errors():
        dotted = ".".join(str(p) for p in e["loc"])
        what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {dotted}: {what}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
