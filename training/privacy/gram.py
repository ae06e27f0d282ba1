"""DP-EASE (`privacy.mode: dp`, `privacy.mechanism: gram`): one Gaussian release of the item-item
Gram matrix, then EASE on it, exported as an ordinary bundle.

The mechanism (user level; neighbouring datasets: add or remove one user's whole history)

1. **Clip.** Each member's binary history x_u (train + val, `Prepared.seen`) is scaled to unit L2
   norm, x̂_u = x_u / ‖x_u‖ (an empty history stays 0). The released statistic is

       G = Σ_u x̂_u x̂_uᵀ        (n_items x n_items, symmetric).

2. **Sensitivity.** Removing user v changes G by exactly x̂_v x̂_vᵀ, whose Frobenius norm is
   ‖x̂_v‖² = 1 (0 for an empty history): ‖G(D) − G(D − v)‖_F ≤ 1 whatever the other users hold.
   G is symmetric, so only its diagonal and strict upper triangle are free. Map G to the vector
   φ(G) = (diag G, √2 · upper G): ‖φ(A)‖₂ = ‖A‖_F for every symmetric A, and φ is linear, so the
   L2 sensitivity of φ(G) is 1 (`test_dp_gram.py` checks both on random data).

3. **Noise.** φ(G) is released with N(0, σ² I) noise, i.e. N(0, σ²) on each diagonal entry and
   N(0, σ²/2) on each strict-upper entry (mirrored to the lower triangle). This is the Gaussian
   mechanism at L2 sensitivity 1; σ is the smallest σ for which it is (ε, δ)-DP by the exact
   condition of the analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm 8),
   Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ) ≤ δ (`gaussian_sigma`), valid for every ε > 0. One release,
   so no composition: the accountant is that formula (`ACCOUNTANT`). δ defaults to 1 / members.

   **With a popularity vector** (`privacy.gram_popularity_share` f > 0, `popularity_share`): the
   same release also carries v = Σ_u x̂_u (one user moves it by ‖x̂_u‖ = 1), so the pair (φ(G), v) is
   noised with N(0, σ_G²) and N(0, σ_v²), 1/σ_G² = (1 − f)/σ², 1/σ_v² = f/σ² (`split_sigma`).
   Scaled by its noise, (φ(G)/σ_G, v/σ_v) + N(0, I), one user moves it by at most
   √(1/σ_G² + 1/σ_v²) = 1/σ: the Gaussian mechanism at sensitivity 1/σ and noise 1, which is the
   single release at σ and sensitivity 1. So (ε, δ) and the accountant are unchanged; f only decides
   how the budget divides (`test_dp_gram.py` checks the distance by hand and Opacus' PRV accountant
   composes the two to the same ε).

   **With item weights** (`privacy.gram_weight_power` β > 0, `weight_power`; needs the vector):
   the two releases become sequential. The popularity vector ṽ is released first (at σ_v, as
   above); the item weights w = clip(ṽ / max ṽ, 0.01, 1)^β (`item_weights`) are read off it, which
   is post-processing of that release; then each member's row is (w ∘ x_u) / ‖w ∘ x_u‖, still unit
   norm, so with w fixed one user still moves φ(G_w) by exactly 1 and the Gram is released at σ_G
   as in step 3. Gaussian mechanisms compose adaptively as Gaussian DP with μ² = 1/σ_G² + 1/σ_v²
   (Dong, Roth & Su 2022, Cor. 3.3), whose (ε, δ) curve is the analytic Gaussian's: the pair is
   exactly as private as the single release at σ, as without weights (`test_dp_gram.py` checks the
   distance given w by hand). The served user vector reads (w ∘ x) P: w is folded into P's rows.

4. **Post-processing (free under DP).** Everything after the release reads only the released
   matrix G̃ and public constants (σ, n_items, the config): PSD projection (negative eigenvalues
   of G̃ set to 0), EASE (Steck 2019) with λ from public constants only (σ, n_items, the config;
   `release_lambda`, below), B = I − P diag(1/diag P), P = (G̃₊ + λI)⁻¹
   (`training.blend.ease_inplace`), optionally factored to `privacy.gram_rank` by B's own
   subspace (`training.blend.factorize` with x = None: the users' data is never read again), and
   the fallback list: the released G̃'s row sums, which before noise are the item user counts
   exactly (Σ_j x̂_ui x̂_uj = x_ui · Σ_j x_uj / ‖x_u‖² = x_ui), combined with the released popularity
   vector when there is one (below), so the bundle's popularity list is the private model's own,
   never raw counts.

The λ rule (`privacy.gram_lambda_rule`, `privacy.gram_lambda_factor`, `release_lambda`). `noise`:
λ = f·σ√(2·n_items), the noise matrix's expected spectral norm (f = 1: the default until issue 17).
`noise_snr` (the default, f = 2.7): λ = f·ρ·σ√(2·n_items) with ρ = σ·n_items / members, the
noise-to-signal ratio of the released diagonal (noise std σ against the noiseless diagonal's mean
trace G / n_items = members / n_items: each member's unit row adds exactly 1 to the trace). So λ
grows as σ² (small ε) and as the user base shrinks relative to the catalog. members is the count
δ = 1/members is set from: the rule treats it as public exactly as δ does, and reads nothing else.
Why: on validation the best multiple c of σ√(2n) grew in proportion to σ (ML-100k, seeds 0-2:
c ≈ 2 at ε 8 (σ 0.47), 4 at ε 4 (0.81), ≥ 8 at ε 2 (1.41), ≥ 16 at ε 1 (2.49)) but that slope did
not carry over to ML-1M, whose 6.4x more members make the same σ smaller against the signal (ML-1M
validation, seed 0-1, ε 8: c = 1 0.1255 / 0.1246, c = 2 0.1197 / 0.1207, c = 4 0.1125 / 0.1140);
ρ is what differs (2.23·σ on ML-100k, 0.77·σ on ML-1M). f was chosen once, on ML-100k
*validation* (Gram released over the train part, the members' val items scored; never the test
split), as the best mean validation NDCG@10 over ε ∈ {8, 4, 2, 1, 0.5} x noise seeds 0-2 among
f ∈ {0.9, 1.3, 1.8, 2.7, 3.6}: vs the old λ = σ√(2n), +0.4 % at ε 8, +1.3 % at ε 4, +6.4 % at ε 2,
+9.8 % at ε 1, +6.8 % at ε 0.5; kept unchanged for ML-1M, where it gives c = 1.08 at ε 8 (c = 1
was the best multiple there) and c = 6.2 at ε 1 (ML-1M validation, seed 0: c = 1 0.0823, 2 0.0836,
4 0.0837, 6.2 0.0832, 12 0.0833). The rule reads no data at release time, so it costs no privacy;
the one-off choice of its form and of f read validation interactions of ML-100k (f) and ML-1M (the
form), which the (ε, δ) of a release does not cover (as for any hyper-parameter whoever writes a
config sets). Tried and not kept (validation, same protocol): EASE restricted to the items whose
noisy row sum (a count: see the fallback) clears t times its noise std, the tail ranked by the
noisy counts (post-processing of the same release): within ±1 % of the full catalog at the same λ
on ML-100k (t ∈ {1, 2, 3}) and +0.4 % on ML-1M at ε 1 (seed 0), not worth a second code path;
spiked-Wigner eigenvalue shrinkage (at ε 1 it keeps 1-2 eigenpairs: popularity only, below EASE);
EASE without the diag(P) normalisation (ridge): equal within noise.
The floor (`privacy.gram_lambda_floor` c, default 8): either rule's λ is raised to at least
c · members / n_items, c times the noiseless Gram's mean diagonal. The noise rule falls as
σ² / members, so for user bases much larger than the catalog it dropped below what EASE needs
on the noiseless Gram itself (ML-1M at 4x the users, `benchmarks/dp_scaling.py`: λ 3.5 against a
best of 6-12, and 4x no better than 2x). c from noiseless validation (unit-row Gram of train,
validation truth): best c = 8 on ML-1M (val NDCG@10 0.1499; 4: 0.1491, 16: 0.1475) and 16 on
ML-100k (0.1741; 8: 0.1716). It binds at none of the recorded figures (ML-100k floor 3.6, ML-1M
10.4, below the rule's λ at every ε ≤ 8).
On the test split (benchmarks/privacy.py, noise seeds 0-2, the same noise draws, vs λ = σ√(2n)):
ML-100k 0.3822 vs 0.3911 at ε 8 (−2.3 %), 0.2330 vs 0.2117 at ε 1 (+10 %; popularity 0.2498);
ML-1M 0.3038 vs 0.3049 at ε 8, 0.2057 vs 0.2104 at ε 1 (−2.2 %): validation (10 % of train) is a
weak proxy at small ε on ML-1M's `given` split. The default stays the validation choice.

The popularity prior (`privacy.gram_prior_weight`, `prior_weight`, `popularity_prior`). At small ε
the noise drowns most pairs, and EASE on the release fell below the plain popularity list
(ML-100k test, ε 1: 0.2330 vs 0.2498), although the release's row sums, each a sum of n_items noisy
entries, still rank items by popularity fairly well. So before EASE the release gets
μ · r rᵀ / Σr added, r its row sums (clipped at 0): the Gram of users who pick items in proportion
to their popularity and nothing else, a low-noise rank-1 estimate that pulls the model towards
popularity where the pairs are noise. Post-processing (it reads the release only). μ = max(0, ρ − 3) / 2
(ρ as for λ) was read off validation (train release, validation truth, noise seeds 0-2; μ grid
0-8): ML-100k ε 8 (ρ 1.05) best μ 0 (μ 1: −2 %); ε 2 (ρ 3.1) μ 0-0.5 equal; ε 1.5 (ρ 4.0)
μ 1 +5 %; ε 1 (ρ 5.6) μ 1-2 +20 % (0.0784 → 0.0937; popularity 0.0996); ε 0.5 (ρ 9.9) μ 2-4 +50 %;
ML-1M ε 1 (ρ 2.3) μ 0 best (μ 0.5 −1 %), ε 0.5 (ρ 4.2) μ 1 +6 %. A prior from the public genres
(the release projected on the span of the genre-weighted popularity vectors) gained ≤ 2 % over
it on ML-100k and ML-1M implicit has no genres: not kept. On test (benchmarks/privacy.py, seeds 0-2,
the same per-seed splits with and without it): ML-100k ε 1 0.2434 vs 0.2293, ε 0.5 0.1270 vs 0.0958,
ε 2 0.3121 vs 0.3126 (μ 0.07); popularity 0.2499.

The popularity vector (`privacy.gram_popularity_share`, `popularity_share`, `combine_popularity`).
The row sums r of the release estimate the item user counts, but each sums n_items noisy entries
(noise std σ·√((n_items + 1)/2): 75 on ML-100k at ε 1 against a most-popular count near 350), so at
small ε the fallback list and the prior's shape were themselves noisy: ranking by r scored 0.068
validation NDCG@10 on ML-100k at ε 1 against 0.101 for exact counts. A vector released beside the
Gram has one noise draw per item instead: with f = 0.26 of the budget it ranks at 0.094. The two
estimates are averaged with inverse-variance weights (v brought to count units by Σr / Σv), and
the fallback and the prior read that; λ and μ follow their rules at σ_G. The share costs the Gram
noise (σ_G = σ/√(1 − f)), so it pays only where the Gram is too noisy to beat popularity: the rule
f = min(0.3, max(0, (ρ − 3)/10)) (public constants, as μ's; 0 wherever μ is 0 at σ). Read off
ML-100k validation (train release, validation truth, noise and audit seeds 0-2), ratio σ_v/σ_G
∈ {1.5, 2, 3, 4} (f 0.31, 0.2, 0.1, 0.06) against none: ε 8 (ρ 1.05) every f lowers NDCG@10 (0.1453
→ 0.1420-0.1447), ε 2 (ρ 3.1) likewise (0.1213 → 0.1163-0.1202), ε 1 (ρ 5.6) f 0.31 0.0925 → 0.1020,
ε 0.5 (ρ 9.9) f 0.31 0.0445 → 0.0799 (exact popularity: 0.1009). The rule's own validation, same
protocol: ε 2 (f 0.014) 0.1211 vs 0.1213, ε 1.5 (f 0.10) 0.1124 vs 0.1124, ε 1 (f 0.26) **0.1025**
vs 0.0925, ε 0.5 (f 0.3) **0.0795** vs 0.0445; 0 at ε ≥ 4. ML-1M implicit: f = 0 at ε ≥ 1 (ρ ≤ 2.3).
The federated Gram does not send the vector (`training/federated/gram.py` refuses a share).

The item weights (`privacy.gram_weight_power`, `weight_power`, `item_weights`). At large ρ most
pairs in the release are noise, and a unit row spends its norm on every item its user touched
alike: a user of 100 items gives each pair 1/100 whether the items are hits or one-offs that no
other member shares. Weighting the rows by the released popularity (w_i ∝ ṽ_i^β before the clip)
moves each user's norm towards the pairs the noise does not drown. It costs a little budget (the
vector's share, at least WEIGHT_SHARE = 0.05) and biases EASE towards popular items, so it pays only
at large ρ: the rule β = 0.25 where ρ ≥ 2 (public constants). Read off validation (train release,
validation truth, noise and audit seeds 0-2 on ML-100k, 0-1 on ML-1M; ad-hoc scripts calling this
module, as `benchmarks/dp_scaling.py` does), val NDCG@10 of the product's release without → with
weights (β 0.25, share max(rule, 0.05)): ML-100k ε 8 (ρ 1.05) 0.1453 → 0.1432, ε 4 (ρ 1.8) 0.1363 →
0.1342, ε 2 (ρ 3.1) 0.1211 → **0.1261**, ε 1.5 (ρ 4.0) 0.1124 → **0.1189**, ε 1 (ρ 5.6) 0.1025 →
**0.1075**; ML-1M ε 2 (ρ 1.3) 0.0948 → 0.0940, ε 1 (ρ 2.3) 0.0836 → **0.0850**, ε 0.5 (ρ 4.2) 0.0744 →
**0.0774**. β 0.5 was equal at ε 1 on ML-100k (0.1077) and worse at ε ≥ 1.5; weights from the *exact*
counts (an upper bound no release reaches) gave at most +12 % (ML-100k ε 1, β 0.5) and nothing at
ε 8 on ML-1M (0.1259 → 0.1263): the weighting helps at small ε, it does not close ML-1M's gap at ε 8.
The federated Gram does not weight (its clients would need ṽ before they send: a second round).

A user's scores are x_u B computed from their own history (on their device or at request time from
the store; the history is not released by the bundle). Served form: user vector z_u = x_u P_k
(`training.export.GramEaseTower`, an ONNX bag over the history), item vectors Q_k, score z_u · Q_i;
full rank (`gram_rank: null`): P = B·c, Q = I / c (c balances the halves for float32).

Not covered by (ε, δ): the test metrics the run logs (they read the test split), and any tuning of
λ / rank on this data by whoever sets the config (the default λ rule was chosen on validation, above). The noise is seeded by `trainer.seed` so that runs
reproduce; whoever knows the seed and the config can recompute the noise, so a release meant for
adversaries must not publish the seed (the same holds for DP-SGD's seeded torch RNG).

Cost: one dense n_items² float64 Gram plus its eigendecomposition (n_items³): ML-1M's 3,706
items ~0.1 GB and seconds; the catalog, not the users, bounds it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.stats import norm

from training import blend, evaluation
from training.config import ConfigError, TrainConfig
from training.data import CSR
from training.trainer import FitResult

log = logging.getLogger(__name__)

KIND = "ease_dp"  # the manifest's model.kind and the MLflow `model` tag
ACCOUNTANT = "analytic gaussian (Balle & Wang 2018)"
MECHANISM = "gaussian gram release (dp-ease), user-level"
CLIPPING = "each user's binary history scaled to unit L2 norm: one user's x x^T has Frobenius norm 1"


# --------------------------------------------------------------------------- the accountant
def gaussian_delta(sigma: float, eps: float, sensitivity: float = 1.0) -> float:
    """δ(ε) of the Gaussian mechanism N(0, σ²) at L2 sensitivity Δ (exact, Balle & Wang 2018, Thm 8):
    δ = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ). Decreasing in σ and in ε."""
    a, b = sensitivity / (2.0 * sigma), eps * sigma / sensitivity
    return float(norm.cdf(a - b) - math.exp(eps + norm.logcdf(-a - b)))  # e^ε Φ(x) as exp(ε + log Φ(x)): no overflow


def gaussian_sigma(eps: float, delta: float, sensitivity: float = 1.0, tol: float = 1e-12) -> float:
    """Smallest σ (to `tol`, from above) for which N(0, σ²) on a query of L2 sensitivity Δ is (ε, δ)-DP:
    bisection on the exact condition gaussian_delta(σ, ε) ≤ δ; the returned σ satisfies it."""
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    lo, hi = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(hi, eps, sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while gaussian_delta(lo, eps, sensitivity) <= delta:
        hi, lo = lo, lo / 2.0
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, eps, sensitivity) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0, tol: float = 1e-10) -> float:
    """Smallest ε (to `tol`, from above) with gaussian_delta(σ, ε) ≤ δ: the ε a given σ achieves."""
    if sigma <= 0:
        return math.inf
    lo, hi = 0.0, 1.0
    while gaussian_delta(sigma, hi, sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol * max(hi, 1.0):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(sigma, mid, sensitivity) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def noise_lambda(sigma: float, n_items: int) -> float:
    """λ = σ·√(2·n_items): the expected spectral norm of the symmetric noise matrix (a Wigner matrix
    with off-diagonal std σ/√2 has spectral norm ≈ 2·(σ/√2)·√n). Reads no data."""
    return sigma * math.sqrt(2.0 * n_items)


LAMBDA_RULES = ("noise", "noise_snr")  # privacy.gram_lambda_rule
LAMBDA_TEXT = {"noise": "max({factor:g} * sigma * sqrt(2 * n_items), {floor:g} * members / n_items) (no data read)",
               "noise_snr": "max({factor:g} * (sigma * n_items / members) * sigma * sqrt(2 * n_items), {floor:g} * members / n_items) (no data read)"}  # fmt: skip


def lambda_text(rule: str, factor: float, floor: float) -> str:
    """The manifest's / MLflow's `lambda_rule` line of `release_lambda` with these settings."""
    return LAMBDA_TEXT[rule].format(factor=factor, floor=floor)


def release_lambda(sigma: float, n_items: int, members: int, rule: str = "noise_snr", factor: float = 2.7, floor: float = 8.0) -> float:
    """EASE's λ from public constants only (`privacy.gram_lambda_rule`, `privacy.gram_lambda_factor`,
    `privacy.gram_lambda_floor`):
    `noise`: factor · σ√(2·n_items) (the noise matrix's spectral norm, `noise_lambda`);
    `noise_snr`: factor · ρ · σ√(2·n_items) with ρ = σ·n_items / members, the noise-to-signal ratio
    of the released diagonal (noise std σ; the noiseless diagonal's mean is trace G / n_items =
    members / n_items, every member's unit row adding exactly 1 to the trace). `members` is the
    count δ = 1/members is already set from (see the module docstring).
    Either is raised to at least floor · members / n_items: floor times the mean diagonal, the scale
    at which EASE on the *noiseless* unit-row Gram is at its best (a large user base makes ρ, and the
    noise rule's λ, small; the Gram still needs EASE's own regularisation). floor 0: none."""
    if rule not in LAMBDA_RULES:
        raise ValueError(f"privacy.gram_lambda_rule: {rule!r} is not one of {LAMBDA_RULES}")
    if not factor > 0:
        raise ValueError(f"privacy.gram_lambda_factor must be > 0, got {factor}")
    if not floor >= 0:
        raise ValueError(f"privacy.gram_lambda_floor must be >= 0, got {floor}")
    if members < 1:
        raise ValueError(f"release_lambda: members must be >= 1, got {members}")
    base = factor * noise_lambda(sigma, n_items)
    lam = base * sigma * n_items / members if rule == "noise_snr" else base
    return max(lam, floor * members / n_items)


PRIOR_TEXT = "max(0, rho - 3) / 2, rho = sigma * n_items / members (no data read)"


def prior_weight(sigma: float, n_items: int, members: int) -> float:
    """μ of the popularity prior from public constants only (`privacy.gram_prior_weight: null`):
    μ = max(0, ρ − 3) / 2 with ρ = σ·n_items / members, the released diagonal's noise-to-signal ratio
    of `release_lambda`. 0 (no prior) while the noise is below ~3x the diagonal's signal; then
    growing with it. Read off validation (module docstring); σ = 0 gives 0."""
    if members < 1:
        raise ValueError(f"prior_weight: members must be >= 1, got {members}")
    return max(0.0, sigma * n_items / members - 3.0) / 2.0


SHARE_TEXT = "min(0.3, max(0, (rho - 3) / 10)), rho = sigma * n_items / members (no data read)"


def popularity_share(sigma: float, n_items: int, members: int) -> float:
    """The share f of the budget that the popularity vector gets (`privacy.gram_popularity_share: null`),
    from public constants only: f = min(0.3, max(0, (ρ − 3) / 10)), ρ = σ·n_items / members as for
    `prior_weight`. 0 (no second release: the whole budget on the Gram) while ρ ≤ 3, where the Gram's
    own row sums rank items well enough; up to 0.3 at ρ ≥ 6. Read off validation (module docstring)."""
    if members < 1:
        raise ValueError(f"popularity_share: members must be >= 1, got {members}")
    return min(0.3, max(0.0, (sigma * n_items / members - 3.0) / 10.0))


def split_sigma(sigma: float, share: float) -> tuple[float, float]:
    """(σ_G, σ_v) of the joint release that spends `share` f of a Gaussian mechanism of noise σ (at L2
    sensitivity 1) on the popularity vector: 1/σ_G² = (1 − f)/σ², 1/σ_v² = f/σ², so 1/σ_G² + 1/σ_v² =
    1/σ² and the pair is exactly as private as one release at σ (module docstring, step 3).
    f = 0: (σ, inf), no vector released. σ = 0 (no noise): (0, 0)."""
    if not 0 <= share < 1:
        raise ValueError(f"privacy.gram_popularity_share must be in [0, 1), got {share}")
    if share == 0:
        return sigma, math.inf
    return sigma / math.sqrt(1.0 - share), sigma / math.sqrt(share)


WEIGHT_TEXT = "0.25 where rho >= 2, else 0; rho = sigma * n_items / members (no data read)"
WEIGHT_SHARE = 0.05  # the least popularity share a weighted release spends (the weights are read off that vector)
WEIGHT_FLOOR = 0.01  # the smallest relative popularity a weight is computed from: no item's history entry drops to 0


def weight_power(sigma: float, n_items: int, members: int) -> float:
    """β of the item weights (`privacy.gram_weight_power: null`), from public constants only: 0.25 where
    ρ = σ·n_items / members ≥ 2, else 0 (unweighted). Read off validation (module docstring):
    the weighting pays where the Gram's noise is large against its diagonal and costs below."""
    if members < 1:
        raise ValueError(f"weight_power: members must be >= 1, got {members}")
    return 0.25 if sigma * n_items / members >= 2.0 else 0.0


def item_weights(released_vector: np.ndarray, power: float) -> np.ndarray:
    """w = clip(ṽ / max ṽ, WEIGHT_FLOOR, 1)^β from the *released* popularity vector ṽ (post-processing of
    that release; ones where β is 0 or nothing is positive). Monotone in ṽ, in (0, 1]."""
    v = np.asarray(released_vector, np.float64)
    top = float(v.max()) if len(v) else 0.0
    if power == 0 or not top > 0:
        return np.ones(len(v))
    return np.clip(v / top, WEIGHT_FLOOR, 1.0) ** power


def combine_popularity(row_sums: np.ndarray, vector: np.ndarray, sigma_gram: float, sigma_vector: float) -> np.ndarray:
    """Item popularity from both released statistics, in user-count units (post-processing only).

    r, the released Gram's row sums, estimates the item user counts with noise variance
    (n_items + 1)·σ_G²/2 per item (a diagonal entry at σ_G² and n_items − 1 strict-upper ones at σ_G²/2);
    v, the released popularity vector Σ_u x̂_u, counts each user of the item with weight 1/√|x_u|,
    noise variance σ_v². v is put in r's units by c = Σr₊ / Σv₊ (released quantities) and the two are
    averaged with inverse-variance weights: (r/var_r + c·v/var_v) / (1/var_r + 1/var_v)."""
    r, v = np.asarray(row_sums, np.float64), np.asarray(vector, np.float64)
    n = len(r)
    var_r = (n + 1) * sigma_gram**2 / 2.0
    c = np.clip(r, 0, None).sum() / max(np.clip(v, 0, None).sum(), 1e-300)
    var_v = (c * sigma_vector) ** 2
    if var_r == 0 or var_v == 0:  # no noise on one side: take it
        return r.copy() if var_r == 0 else c * v
    return (r / var_r + c * v / var_v) / (1.0 / var_r + 1.0 / var_v)


def popularity_prior(row_sums: np.ndarray) -> np.ndarray:
    """The independence model r rᵀ / Σr of the released row sums r (negatives clipped to 0): the Gram
    that users who pick items in proportion to their popularity, and nothing else, would give.
    Its row sums are r again. All zeros when Σr ≤ 0. (The fallback list reads r before the prior is added.)"""
    r = np.clip(np.asarray(row_sums, np.float64), 0.0, None)
    total = r.sum()
    return np.outer(r, r) / total if total > 0 else np.zeros((len(r), len(r)))


# --------------------------------------------------------------------------- the mechanism
def unit_rows(x: sp.spmatrix) -> sp.csr_matrix:
    """Each row of a sparse users x items matrix scaled to unit L2 norm (empty rows stay empty)."""
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    x.data /= np.repeat(np.where(norms > 0, norms, 1.0), np.diff(x.indptr))
    return x


def popularity_statistic(history: CSR, n_items: int) -> np.ndarray:
    """The popularity vector released beside G when `privacy.gram_popularity_share` > 0: v = Σ_u x̂_u
    (each user's unit row, so one user moves it by ‖x̂_u‖ = 1), dense float64 (n_items,)."""
    x = unit_rows(blend.binary_matrix(history, np.arange(len(history[0]) - 1), n_items))
    return np.asarray(x.sum(axis=0), dtype=np.float64).ravel()


def gram_statistic(history: CSR, n_items: int, weights: np.ndarray | None = None) -> np.ndarray:
    """The statistic released: G = Σ_u x̂_u x̂_uᵀ over every user of `history` (binary, unit rows),
    dense float64 (n_items x n_items). With `weights` w: x̂_u = (w ∘ x_u) / ‖w ∘ x_u‖, still unit norm."""
    x = blend.binary_matrix(history, np.arange(len(history[0]) - 1), n_items)
    if weights is not None:
        x = sp.csr_matrix(x.multiply(np.asarray(weights, np.float64)[None, :]))
    x = unit_rows(x)
    g = np.asarray((x.T @ x).todense(), dtype=np.float64)
    return np.ascontiguousarray(0.5 * (g + g.T))


def add_noise(g: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """G + symmetric Gaussian noise in place: N(0, σ²) on the diagonal, N(0, σ²/2) on each strict-upper
    entry, mirrored (one (n, n) standard-normal draw from `rng`; its diagonal and upper triangle used).
    φ(noise) = (diag, √2·upper) is then N(0, σ² I): the Gaussian mechanism on φ(G). σ = 0: G unchanged."""
    if sigma == 0:
        return g
    n = len(g)
    z = rng.standard_normal((n, n))
    upper = np.triu(z, 1) * (sigma / math.sqrt(2.0))
    g += upper + upper.T
    g[np.diag_indices(n)] += sigma * np.diag(z)
    return g


def psd_project(g: np.ndarray) -> np.ndarray:
    """Nearest (Frobenius) positive semi-definite matrix to the symmetric `g`: negative eigenvalues set to 0."""
    w, q = np.linalg.eigh(g)
    out = (q * np.clip(w, 0.0, None)) @ q.T
    return np.ascontiguousarray(0.5 * (out + out.T))


@dataclass
class GramEase:
    """DP-EASE as served: score of item i for a binary history x = (x P) · Q[i] (= x B[:, i] at full rank)."""

    n_items: int
    lam: float
    rank: int
    user_factors: np.ndarray  # P (n_items x rank), float32
    item_factors: np.ndarray  # Q (n_items x rank), float32
    cold_scores: np.ndarray  # the released item popularity (n_items,): the fallback ranking and the prior's shape
    prior: float = 0.0  # μ of the popularity prior added before EASE (0: none)
    kind: str = KIND
    statistic: str = "the DP-released item Gram matrix"  # what B was fitted on (the manifest's `score` line)
    fallback: str = "row sums of the released Gram"  # what cold_scores are

    def item_vectors(self) -> np.ndarray:
        return np.asarray(self.item_factors, np.float32)

    def user_vectors(self, history: Any) -> np.ndarray:
        """z = x P (float64) for binary histories (users x n_items, scipy sparse or dense)."""
        return np.asarray(history @ self.user_factors.astype(np.float64))

    def scores(self, history: Any) -> np.ndarray:
        return self.user_vectors(history) @ self.item_factors.astype(np.float64).T

    def topk(self, history: CSR, users: np.ndarray, k: int) -> np.ndarray:
        """Top-k lists of `users` from their `history`, history items excluded, in bounded score blocks."""
        step = blend.block_rows(self.n_items)
        out = [np.zeros((0, k), np.int64)]
        for start in range(0, len(users), step):
            batch = users[start : start + step]
            s = self.scores(blend.binary_matrix(history, batch, self.n_items))
            out.append(evaluation.topk_from_scores(s, k, exclude=history[:2], exclude_rows=batch))
        return np.concatenate(out)

    def popularity(self, n: int) -> np.ndarray:
        """Item indices by the released Gram's row sums (noisy item user counts), ties to the lower index."""
        return np.argsort(-self.cold_scores, kind="stable")[:n]

    def describe(self) -> dict[str, Any]:
        return {"kind": "ease", "lambda": self.lam, "rank": self.rank, "n_items": self.n_items, "prior_weight": self.prior, "fallback": self.fallback}


def ease_from_release(g: np.ndarray, lam: float, rank: int | None, noisy: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(P, Q, k) of EASE on the released Gram `g` (overwritten): PSD projection when noise was added
    (a noiseless Gram is PSD already), B by blend.ease_inplace, factored by B alone (no user data),
    balanced as blend.head_factors does (Cov(Q) over items has mean eigenvalue 1)."""
    work = psd_project(g) if noisy else g
    b = blend.ease_inplace(work, lam)
    p, q, k = blend.factorize(b, None, rank)
    n = len(q)
    mean = q.sum(0) / n
    cov_trace = float(np.einsum("ij,ij->", q, q) / n - mean @ mean)
    c = math.sqrt(max(cov_trace / k, 1e-300))
    return p * c, q / c, k


def release(history: CSR, n_items: int, sigma: float, lam: float, rank: int | None, rng: np.random.Generator, prior: float = 0.0,
            share: float = 0.0, power: float = 0.0) -> GramEase:
    """The whole mechanism on `history` (every user with a row is a member): clip, Gram (and, with
    `share` f > 0, the popularity vector), noise at σ split by `split_sigma`, then post-processing
    only: `prior` μ > 0 adds μ·`popularity_prior` of the released popularity before EASE. `lam` is
    EASE's λ for the Gram as released (its rule reads σ_G). σ = 0: no noise (not private; tests and
    the ε = ∞ reference).

    `power` β > 0 (needs `share` > 0): the popularity vector is released *first* (its noise is the
    first draw from `rng`), the item weights w = `item_weights`(ṽ, β) are read off it, and the Gram
    of the weighted unit rows is released second; the served user vector is (w ∘ x) P (w folded
    into P's rows), the fallback and the prior read the Gram's row sums with w ∘ ṽ."""
    sigma_gram, sigma_vector = split_sigma(sigma, share)
    if power > 0:
        if share <= 0:
            raise ValueError("privacy.gram_weight_power > 0 needs a popularity share > 0: the weights are read off the released vector")
        released = popularity_statistic(history, n_items)
        if sigma_vector > 0:
            released = released + sigma_vector * rng.standard_normal(n_items)
        w = item_weights(released, power)
        return release_statistic(gram_statistic(history, n_items, w), sigma_gram, lam, rank, rng, prior, vector=w * released,
                                 vector_sigma=sigma_vector, vector_released=True, weights=w)
    vector = popularity_statistic(history, n_items) if share > 0 else None
    return release_statistic(gram_statistic(history, n_items), sigma_gram, lam, rank, rng, prior, vector=vector, vector_sigma=sigma_vector)


def release_statistic(g: np.ndarray, sigma: float, lam: float, rank: int | None, rng: np.random.Generator, prior: float = 0.0,
                      kind: str = KIND, statistic: str = "the DP-released item Gram matrix", diagonal_fallback: bool = False,
                      vector: np.ndarray | None = None, vector_sigma: float = 0.0, vector_released: bool = False,
                      weights: np.ndarray | None = None) -> GramEase:
    """`release` from the statistic G (n_items x n_items, float64, symmetric; overwritten) at noise σ
    (= σ_G), and optionally the popularity vector at `vector_sigma` (σ_v; noise drawn after G's):
    noise, then post-processing only. The federated Gram (training/federated/gram.py) enters here
    with the sum the clients sent, so both paths share the mechanism after the statistic.
    `diagonal_fallback` (a non-private binary Gram, whose diagonal is the item user counts): the
    fallback ranks by the diagonal instead of the row sums (which there weigh each user by their
    history length). With a vector, the fallback and the prior read `combine_popularity`.
    `vector_released`: the vector already carries its noise (a weighted release drew it first).
    `weights` w: G is the Gram of weighted rows; w is folded into the served user factors' rows."""
    g = add_noise(g, sigma, rng)
    cold = np.diag(g).copy() if diagonal_fallback else g.sum(axis=1)  # read before anything overwrites g
    fallback = "diagonal of the Gram (item user counts)" if diagonal_fallback else "row sums of the released Gram"
    if vector is not None:
        released = np.asarray(vector, np.float64)
        if vector_sigma > 0 and not vector_released:
            released = released + vector_sigma * rng.standard_normal(len(vector))
        cold = combine_popularity(cold, released, sigma, vector_sigma)
        fallback = "inverse-variance mean of the released Gram's row sums and the released popularity vector"
    if prior > 0:
        g += prior * popularity_prior(cold)
    p, q, k = ease_from_release(g, lam, rank, noisy=sigma > 0)
    if weights is not None:
        p = p * np.asarray(weights, np.float64)[:, None]  # x P' = (w ∘ x) P: the user's history weighted as the Gram's rows were
        statistic += " of popularity-weighted histories"
    return GramEase(len(g), float(lam), k, p.astype(np.float32), q.astype(np.float32), cold, float(prior), kind, statistic, fallback)


# --------------------------------------------------------------------------- the rules of one release
@dataclass(frozen=True)
class ReleaseRules:
    """What a release at σ spends where and fits with (public constants and the config only): the
    popularity vector's share, the split σ_G / σ_v, EASE's λ and the prior's μ, each with its rule."""

    share: float
    sigma_gram: float
    sigma_vector: float  # inf when no vector is released
    lam: float
    lam_rule: str
    mu: float
    mu_rule: str
    share_rule: str
    power: float = 0.0  # β of the item weights (0: unweighted)
    power_rule: str = "none"

    def block(self) -> dict[str, Any]:
        """The privacy block's entries for these rules (manifest, /v1/model, MLflow)."""
        return {"lambda": float(self.lam), "lambda_rule": self.lam_rule, "prior_weight": float(self.mu), "prior_rule": self.mu_rule,
                "sigma_gram": float(self.sigma_gram), "sigma_popularity": float(self.sigma_vector) if self.share > 0 else None,
                "popularity_share": float(self.share), "popularity_rule": self.share_rule,
                "weight_power": float(self.power), "weight_rule": self.power_rule}  # fmt: skip


def release_rules(p: Any, sigma: float, n_items: int, members: int, vector: bool = True, weighted: bool = True) -> ReleaseRules:
    """`ReleaseRules` of the `privacy.gram_*` keys `p` for a release at σ over `members` users:
    each key when set, else its rule (`weight_power` at σ; `popularity_share`, at least WEIGHT_SHARE
    where β > 0; `release_lambda` and `prior_weight` at σ_G).
    `vector` False: the path cannot release the popularity vector (federated silos), share 0.
    `weighted` False: the path cannot weight the histories (federated: the clients would need the
    weights before they send), β 0. A set β > 0 where it cannot apply, or with a set share of 0, is a ConfigError."""
    explicit = p.gram_weight_power
    if not (vector and weighted):
        if explicit:
            raise ConfigError("privacy.gram_weight_power: item weights are not available on this path (federated); set it to 0 or null")
        power, power_rule = 0.0, "none: no item weights on this path"
    elif explicit is not None:
        power, power_rule = float(explicit), "privacy.gram_weight_power"
    elif p.gram_popularity_share == 0:
        power, power_rule = 0.0, "none: privacy.gram_popularity_share is 0 (the weights are read off the popularity vector)"
    else:
        power, power_rule = weight_power(sigma, n_items, members), WEIGHT_TEXT
    if vector:
        share = p.gram_popularity_share if p.gram_popularity_share is not None else popularity_share(sigma, n_items, members)
        share_rule = "privacy.gram_popularity_share" if p.gram_popularity_share is not None else SHARE_TEXT
        if power > 0 and p.gram_popularity_share is None and share < WEIGHT_SHARE:
            share, share_rule = WEIGHT_SHARE, f"{WEIGHT_SHARE:g} (the least a weighted release spends; the rule {SHARE_TEXT} gives {share:.3g})"
        if power > 0 and share == 0:
            raise ConfigError("privacy.gram_weight_power > 0 needs privacy.gram_popularity_share > 0 (or null): the weights are read off the released popularity vector")
    else:
        share, share_rule = 0.0, "none: no popularity vector on this path"
    sigma_gram, sigma_vector = split_sigma(sigma, share)
    if p.gram_lambda is not None:
        lam, lam_rule = float(p.gram_lambda), "privacy.gram_lambda"
    else:
        lam = release_lambda(sigma_gram, n_items, members, p.gram_lambda_rule, p.gram_lambda_factor, p.gram_lambda_floor)
        lam_rule = lambda_text(p.gram_lambda_rule, p.gram_lambda_factor, p.gram_lambda_floor)
    if p.gram_prior_weight is not None:
        mu, mu_rule = float(p.gram_prior_weight), "privacy.gram_prior_weight"
    else:
        mu, mu_rule = prior_weight(sigma_gram, n_items, members), PRIOR_TEXT
    return ReleaseRules(share, sigma_gram, sigma_vector, lam, lam_rule, mu, mu_rule, share_rule, power, power_rule)


# --------------------------------------------------------------------------- the pipeline's fit
def is_gram(cfg: TrainConfig) -> bool:
    return cfg.privacy.mode == "dp" and cfg.privacy.mechanism == "gram"


def fit_gram(cfg: TrainConfig, data, tracker) -> tuple[GramEase, FitResult]:
    """Release the Gram of the members' train + val histories once and fit EASE on it; returns the
    model and a FitResult whose `privacy` block the ledger, manifest, MLflow and /v1/model read."""
    started = time.perf_counter()
    p = cfg.privacy
    n_items = data.dataset.n_items
    members = np.flatnonzero(np.diff(data.seen[0]) > 0)  # the users whose data the release covers (the ledger's)
    n = len(members)
    if n == 0:
        raise ConfigError("privacy.mechanism: gram needs at least one training user")
    delta = p.delta if p.delta is not None else 1.0 / n
    sigma = p.noise_multiplier if p.target_epsilon is None else gaussian_sigma(p.target_epsilon, delta)
    epsilon = gaussian_epsilon(sigma, delta)
    rules = release_rules(p, sigma, n_items, n)
    share, sigma_gram, lam, mu = rules.share, rules.sigma_gram, rules.lam, rules.mu
    model = release(data.seen, n_items, sigma, lam, p.gram_rank, np.random.default_rng(cfg.trainer.seed), mu, share, rules.power)
    seconds = time.perf_counter() - started
    log.info("DP-EASE: %d users, %d items, sigma %.4f (epsilon %.4g, delta %.3g, %s; Gram %.4f, popularity share %.2f), lambda %.4g, prior %.3g, "
             "item weight power %.2g, rank %d (%.1fs)", n, n_items, sigma, epsilon, delta, ACCOUNTANT, sigma_gram, share, lam, mu, rules.power, model.rank, seconds)  # fmt: skip
    privacy = {
        "mode": "dp",
        "unit": "user",
        "mechanism": MECHANISM,
        "accountant": ACCOUNTANT,
        "epsilon": float(epsilon),
        "delta": float(delta),
        "target_epsilon": p.target_epsilon,
        "sigma": float(sigma),
        "noise_multiplier": float(sigma),  # sensitivity 1: σ / Δ = σ
        "sensitivity": 1.0,
        "clipping": CLIPPING,
        "releases": 1,
        "training_users": int(n),
        "rank": int(model.rank),
        **rules.block(),  # lambda, prior, popularity share and the split sigma, each with its rule
        "fallback": model.fallback,
        "noise_seed": cfg.trainer.seed,
    }
    if tracker.enabled:
        tracker.log_metrics({"privacy/epsilon": epsilon, "privacy/delta": delta, "privacy/sigma": sigma, "privacy/noise_multiplier": sigma, "privacy/sigma_gram": sigma_gram,
                             "privacy/popularity_share": share, "ease/lambda": lam, "ease/rank": float(model.rank), "ease/prior_weight": mu,
                             "ease/weight_power": rules.power})  # fmt: skip
        keys = ("mechanism", "gram_lambda", "gram_rank", "gram_lambda_rule", "gram_lambda_factor", "gram_lambda_floor", "gram_prior_weight",
                "gram_popularity_share", "gram_weight_power")  # fmt: skip
        tracker.log_params({f"privacy.{key}": getattr(p, key) for key in keys})  # None -> ""
        tracker.set_tags({"model": KIND, "privacy.mode": "dp", "privacy.unit": "user", "privacy.mechanism": MECHANISM, "privacy.accountant": ACCOUNTANT,
                          "privacy.epsilon": f"{epsilon:.3f}", "privacy.delta": f"{delta:.3g}"})  # fmt: skip
    return model, FitResult(1, float("nan"), 1, [], seconds, privacy)


def gram_run_name(cfg: TrainConfig, dataset_name: str, privacy: dict[str, Any] | None) -> str:
    """`ease_dp-ml100k-dp-eps8-s0`: the tracking run name with this model's kind."""
    from training.tracking import dataset_label, model_kind, privacy_label

    return cfg.tracking.run_name or "-".join((model_kind(cfg), dataset_label(cfg.data.source, dataset_name), privacy_label(cfg, privacy), f"s{cfg.trainer.seed}"))
