"""DP-EASE: one Gaussian release of the item-item Gram matrix, then EASE on it (post-processing).

    python benchmarks/dp_ease.py --data ml100k                          # eps 8,1,inf; noise seeds 0,1,2
    python benchmarks/dp_ease.py --data ml100k --epsilons 8 --noise-seeds 0

Split: the one of benchmarks/privacy.py (configs/two_tower_ml100k.yaml, MS stratified protocol,
privacy.audit_holdout=0.2: a seeded 20 % of the users kept out as the audit's non-members).
Neighbouring datasets: add / remove one training user, delta = 1 / (training users), as DP-SGD.

Mechanism (user level):
  1. each member's binary train history x_u is scaled to unit L2 norm, x^_u = x_u / |x_u|, so that
     one user's contribution x^_u x^_uᵀ to G = Σ_u x^_u x^_uᵀ has Frobenius norm exactly 1;
  2. G is released once with Gaussian noise: N(0, σ²) on the diagonal, N(0, σ²/2) on each entry
     of the strict upper triangle, mirrored. The vector (diag G, √2 · upper G) has the same L2 norm
     as G in Frobenius norm, so its L2 sensitivity is 1 and σ is that of the analytic Gaussian
     mechanism (Balle & Wang 2018) for (ε, δ) at sensitivity 1 (`gaussian_sigma`);
  3. post-processing (free under DP): projection onto the PSD cone, optionally truncated to the
     top-k eigenpairs (`psd_project`), then EASE B = I − P·diag(1/diag P), P = (G~ + λI)⁻¹
     (`ease_weights`). A user scores items locally with their own binary history: x_u B
     (x_u = train for validation, train + val for test; neither is released).

Hyper-parameters and the privacy accounting. The (ε, δ) of the release covers the Gram matrix only.
Choosing (k, λ) on validation NDCG reads the members' validation interactions once per grid
point: that selection is OUTSIDE the accountant (the same holds for DP-SGD's early stopping on
validation in benchmarks/privacy.py). The "fixed" row uses no validation data: full rank (PSD
projection only) and λ = σ·√(2·n_items), the expected operator norm of the noise matrix (a
Wigner matrix with off-diagonal std σ/√2 has spectral norm ≈ 2·(σ/√2)·√n), i.e. regularise at the
noise level. The rule depends only on σ and n_items; it was fixed in this script before its first
run (it was not tuned on this script's outputs; the exploratory runs that led to the script had
shown the validation-tuned curves, not this rule's figure). It needs σ > 0: no fixed row at ε = inf.

Noise seed s draws the noise from np.random.default_rng(1000 + s) (the offset of the exploratory
runs, kept so that their figures are reproduced). Prints a table and writes JSON (default
benchmarks/results/dp_ease.json). Exit status 2 when ML-100k is asked for but absent.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402  (puts the repository on sys.path too)

NOISE_SEED_OFFSET = 1000
RANKS = [16, 32, 64, 128, 256, None]  # None: all items (PSD projection only)
LAMS = [4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0]
ACCOUNTANT_NOTE = ("(k, lambda) chosen on validation NDCG: that selection reads the members' validation interactions "
                   "and is outside the (eps, delta) accountant, which covers the Gram release only; the fixed row "
                   "(full rank, lambda = sigma*sqrt(2*n_items)) uses no validation data")


# ---------------------------------------------------------------- the mechanism (training/privacy/gram.py's)

from training.privacy.gram import add_noise, gaussian_sigma  # noqa: E402  (the product's accountant and noise)
from training.privacy.gram import noise_lambda as fixed_lambda  # noqa: E402  (λ = σ·√(2·n_items), the fixed row's)
from peers import ease_weights  # noqa: E402  (EASE's B from a PSD Gram matrix: Cholesky solve; peers.EASE's too)

CONFIGS = {"ml100k": harness.CONFIGS / "two_tower_ml100k.yaml", "synthetic": harness.CONFIGS / "two_tower.yaml"}  # the split's config


def noisy_gram(histories: np.ndarray, sigma: float, rng: np.random.Generator | None) -> np.ndarray:
    """Σ_u x^_u x^_uᵀ of the rows of dense `histories` (users x items) scaled to unit L2 norm (all-zero
    rows stay zero: one user's x^ x^ᵀ has Frobenius norm 1) plus the product's release noise
    (training.privacy.gram.add_noise: N(0, σ²) diagonal, N(0, σ²/2) strict upper, mirrored; one
    (n_items, n_items) standard-normal draw from `rng`). σ = 0: no noise, rng unread."""
    x = np.asarray(histories, dtype=np.float64)
    n = np.sqrt((x * x).sum(axis=1, keepdims=True))
    x = np.divide(x, n, out=np.zeros_like(x), where=n > 0)
    return add_noise(x.T @ x, sigma, rng)


def eig_desc(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    w, q = np.linalg.eigh(gram)
    order = np.argsort(-w, kind="stable")
    return w[order], q[:, order]


def psd_project(gram: np.ndarray, rank: int | None = None, eig: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Nearest (Frobenius) positive semi-definite matrix to the symmetric `gram`: negative eigenvalues
    set to 0; with `rank`, only the `rank` largest eigenpairs are kept (best PSD approximation of that
    rank). `eig` = eig_desc(gram) when already computed. Post-processing: costs no privacy."""
    w, q = eig if eig is not None else eig_desc(gram)
    if rank is not None:
        w, q = w[:rank], q[:, :rank]
    w = np.clip(w, 0.0, None)
    out = (q * w) @ q.T
    return 0.5 * (out + out.T)


# ---------------------------------------------------------------- the benchmark


def dense(csr, n_users: int, n_items: int) -> np.ndarray:
    """Binary users x items matrix of a (indptr, indices, ...) CSR."""
    x = np.zeros((n_users, n_items))
    x[np.repeat(np.arange(n_users), np.diff(csr[0])), csr[1]] = 1.0
    return x


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, "dp_ease")
    p.add_argument("--data", default="ml100k", help="ml100k[:PATH] or synthetic")
    p.add_argument("--epsilons", default="8,1,inf", help="comma-separated epsilons; inf = no noise (default 8,1,inf)")
    p.add_argument("--noise-seeds", default="0,1,2", help="comma-separated noise seeds (default 0,1,2)")
    p.add_argument("--audit-holdout", type=float, default=0.2, help="users held out as in benchmarks/privacy.py (default 0.2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args(argv)
    epsilons = list(dict.fromkeys(harness.numbers(p, "--epsilons", args.epsilons, float)))
    seeds = harness.numbers(p, "--noise-seeds", args.noise_seeds)
    if not epsilons or not seeds or any(e <= 0 for e in epsilons):
        p.error("give at least one epsilon (> 0) and one noise seed")

    from training.evaluation import evaluate_scores
    from training.pipeline import popularity_metrics

    source = harness.dataset(p, args.data, list(CONFIGS))
    if source is None:
        return 2
    name = source.name
    overrides = ["tracking.enabled=false", "store.load=false", f"privacy.audit_holdout={args.audit_holdout}", *args.set, *source.overrides]
    started = time.perf_counter()
    if (loaded := harness.load(CONFIGS[name], overrides, "dp_ease.py: error", prepare=True)) is None:  # the non-private config: the same split
        return 2
    cfg, data = loaded
    k, key = cfg.task.eval_k, f"ndcg@{cfg.task.eval_k}"
    n_users, n_items = data.dataset.n_users, data.dataset.n_items
    x_train, x_seen = dense(data.train, n_users, n_items), dense(data.seen, n_users, n_items)
    members = np.flatnonzero(x_train.sum(axis=1) > 0)
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else 1.0 / len(members)
    val_users, test_users = harness.users_with(data.val), harness.users_with(data.test)
    val_metrics = lambda b: evaluate_scores(lambda u: x_train[u] @ b, val_users, data.train[:2], data.val[:2], n_items, k=k)  # noqa: E731
    test_metrics = lambda b: evaluate_scores(lambda u: x_seen[u] @ b, test_users, data.seen[:2], data.test[:2], n_items, k=k)  # noqa: E731
    pop = popularity_metrics(data, k)[key]
    print(f"{name}: {len(members)} training users (members), {n_items} items, delta {delta:.4g}; "
          f"popularity (non-private) test {key} {pop:.4f}", flush=True)  # fmt: skip

    results = []
    for eps in epsilons:
        sigma = 0.0 if math.isinf(eps) else gaussian_sigma(eps, delta)
        lam_fixed = fixed_lambda(sigma, n_items) if sigma > 0 else None
        runs = []
        for seed in seeds if sigma > 0 else seeds[:1]:  # no noise: every seed is the same release
            t0 = time.perf_counter()
            gram = noisy_gram(x_train[members], sigma, np.random.default_rng(NOISE_SEED_OFFSET + seed))
            eig = eig_desc(gram)
            grid = []
            for rank in RANKS:
                g = psd_project(gram, rank, eig)
                grid += [{"rank": rank or n_items, "lam": lam, "val_ndcg": val_metrics(ease_weights(g, lam))[key]} for lam in LAMS]
            best = max(grid, key=lambda r: r["val_ndcg"])  # ties: the earlier grid point
            b = ease_weights(psd_project(gram, None if best["rank"] == n_items else best["rank"], eig), best["lam"])
            run = {"seed": seed, "rank": best["rank"], "lam": best["lam"], "val_ndcg": best["val_ndcg"], "test": test_metrics(b), "grid": grid}
            line = f"  eps={eps:g} seed {seed}: val-tuned k={best['rank']} lam={best['lam']:g} (val {best['val_ndcg']:.4f}) -> test {key} {run['test'][key]:.4f}"
            if sigma > 0:
                run["fixed"] = {"rank": n_items, "lam": lam_fixed, "test": test_metrics(ease_weights(psd_project(gram, None, eig), lam_fixed))}
                line += f"; fixed lam={lam_fixed:.1f} -> {run['fixed']['test'][key]:.4f}"
            run["seconds"] = time.perf_counter() - t0
            runs.append(run)
            print(line + f" ({run['seconds']:.0f}s)", flush=True)
        row = {"epsilon": eps, "delta": delta, "sigma": sigma, "noise_seeds": [r["seed"] for r in runs],
               "val_tuned": harness.summarize([r["test"] for r in runs]), "runs": runs}  # fmt: skip
        if sigma > 0:
            row["fixed"] = {"rank": n_items, "lam": lam_fixed, **harness.summarize([r["fixed"]["test"] for r in runs])}
        results.append(row)

    report = {
        "dataset": name, "split": f"{harness.repo_relative(CONFIGS[name])}, ms-recommenders stratified, privacy.audit_holdout={args.audit_holdout}",
        "k": k, "n_members": int(len(members)), "delta": delta,
        "mechanism": "unit-L2 rows; Gram + N(0, s^2) diagonal, N(0, s^2/2) strict upper (mirrored); s = analytic Gaussian mechanism at L2 sensitivity 1",
        "grid": {"ranks": [r or n_items for r in RANKS], "lams": LAMS}, "accounting": ACCOUNTANT_NOTE, "popularity_ndcg": pop,
        "results": results, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out = harness.write(report, args, "dp_ease", script=__file__, argv=argv, libraries=["scipy", "torch"])

    cols = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}"]
    cells = lambda m: "".join(f"  {m[c]:.4f} ± {m[c + '_std']:.4f}" for c in cols)  # noqa: E731
    print(f"\n{name}: DP-EASE, {len(members)} members, delta {delta:.3g}  ({report['seconds']:.0f} s); mean ± std over noise seeds")
    print(f"{'eps':>5}{'sigma':>8}  {'row':<24}" + "".join(f"{c:>18}" for c in cols) + "   (k, lambda) per seed")
    for row in results:
        picks = ", ".join(f"({r['rank']}, {r['lam']:g})" for r in row["runs"])
        print(f"{row['epsilon']:>5g}{row['sigma']:>8.3f}  {'val-tuned':<24}" + cells(row["val_tuned"]) + f"   {picks}")
        if "fixed" in row:
            label = f"fixed (lam={row['fixed']['lam']:.1f})"
            print(f"{'':>13}  {label:<24}" + cells(row["fixed"]) + f"   (all, {row['fixed']['lam']:.1f})")
    print(f"  popularity (non-private) {key}: {pop:.4f}")
    print(f"  note: {ACCOUNTANT_NOTE}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
