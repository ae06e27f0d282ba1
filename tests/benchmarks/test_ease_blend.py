"""The two-tower x EASE blend of benchmarks/ease_blend.py: the score formula by hand, and its
dot-product form (the servable one) against the formula on a tiny random case."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import load_script

eb = load_script("benchmarks/ease_blend.py")


def test_blend_scores_hand_example():
    # T = [1, 2, 3]: sd (ddof 0) = sqrt(2/3); E = [3, 0, 0]: mean 1, sd = sqrt((4 + 1 + 1)/3) = sqrt 2
    # a = 0.5: 0.5 T / sqrt(2/3) + 0.5 E / sqrt 2
    t, e = np.array([[1.0, 2.0, 3.0]]), np.array([[3.0, 0.0, 0.0]])
    want = 0.5 * np.array([1, 2, 3]) / np.sqrt(2 / 3) + 0.5 * np.array([3, 0, 0]) / np.sqrt(2)
    np.testing.assert_allclose(eb.blend_scores(t, e, 0.5), [want])
    np.testing.assert_allclose(want, [1.6731, 1.2247, 1.8371], atol=1e-4)
    # per-user scale: multiplying one user's scores by c > 0 changes nothing; a = 1 / 0 are the models alone
    np.testing.assert_allclose(eb.blend_scores(7 * t, 0.1 * e, 0.5), [want])
    np.testing.assert_allclose(eb.blend_scores(t, e, 1.0), t / np.sqrt(2 / 3))
    # a user with constant scores (no history: x_u B = 0) keeps the other model's term only
    np.testing.assert_allclose(eb.blend_scores(t, np.zeros((1, 3)), 0.4), 0.4 * t / np.sqrt(2 / 3))


@pytest.mark.parametrize("a", [0.0, 0.3, 0.9, 1.0])
def test_dot_product_form_ranks_exactly_like_the_formula(a):
    rng = np.random.default_rng(11)
    n_users, n_items, dim = 6, 9, 4
    u, v = rng.normal(size=(n_users, dim)), rng.normal(size=(n_items, dim))
    x = (rng.random((n_users, n_items)) < 0.4).astype(float)
    x[0] = 0.0  # a cold user
    x[1, :3] = 1.0  # at least one warm user with a history
    b = rng.normal(size=(n_items, n_items))
    np.fill_diagonal(b, 0.0)

    formula = eb.blend_scores(u @ v.T, x @ b, a)
    users, items = eb.blend_embeddings(u, v, x, b, a)
    assert users.shape == (n_users, dim + n_items) and items.shape == (n_items, dim + n_items)
    dot = users @ items.T
    np.testing.assert_allclose(dot, formula, atol=1e-10)
    warm = x.sum(1) > 0  # the cold user's row is all ties at a = 0: its order is arbitrary
    assert np.array_equal(np.argsort(-dot[warm], axis=1), np.argsort(-formula[warm], axis=1))
