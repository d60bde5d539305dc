"""The numpy Shapley reference against brute force, the Shapley axioms and the shap library."""

import itertools
from math import factorial

import numpy as np
import pytest

from fedmfs.core.shapley import (
    coalition_masks,
    coalition_values,
    exact_shapley,
    modality_scores,
    permutation_shapley,
    shapley_from_coalition_values,
)


def softmax_fusion(w):
    def f(z, mask):
        logits = z.reshape(len(z), -1) @ w
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    return f


@pytest.fixture
def problem():
    rng = np.random.default_rng(1)
    n, m, c, b = 5, 4, 3, 6
    w = rng.normal(size=(m * c, c))
    x = rng.dirichlet(np.ones(c), size=(n, m))
    bg = rng.dirichlet(np.ones(c), size=(b, m))
    y = rng.integers(0, c, n)
    return softmax_fusion(w), x, bg, y, w


def brute(f, x, bg, players, kind, y):
    n, m, c = x.shape

    def v(s):
        z = np.repeat(bg[None], n, 0)
        for j in s:
            z[:, :, j] = x[:, None, j]
        p = f(z.reshape(-1, m, c), None).reshape(n, len(bg), c)
        if kind == "prob":
            return p.mean(1)
        return np.log(p[np.arange(n), :, y]).mean(1)

    k = len(players)
    out = np.zeros((n, m) + ((c,) if kind == "prob" else ()))
    for j in players:
        others = [p for p in players if p != j]
        for r in range(len(others) + 1):
            for s in itertools.combinations(others, r):
                wgt = factorial(len(s)) * factorial(k - len(s) - 1) / factorial(k)
                out[:, j] += wgt * (v(list(s) + [j]) - v(list(s)))
    return out, v


@pytest.mark.parametrize("kind", ["prob", "loglik"])
@pytest.mark.parametrize("mask", [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 0]])
def test_exact_equals_brute_force_and_is_efficient(problem, kind, mask):
    f, x, bg, y, _ = problem
    mask = np.array(mask, bool)
    players = list(np.nonzero(mask)[0])
    phi = exact_shapley(f, x, bg, mask, kind, y)
    ref, v = brute(f, x, bg, players, kind, y)
    np.testing.assert_allclose(phi, ref, atol=1e-12)
    # efficiency: the values sum to v(all) - v(empty) per sample (before absolute values)
    np.testing.assert_allclose(phi.sum(1), v(players) - v([]), atol=1e-12)
    # a modality the client lacks is no player and scores exactly 0
    assert np.all(phi[:, ~mask] == 0)


def test_symmetric_modalities_get_equal_values(problem):
    _, x, bg, y, w = problem
    c = x.shape[2]
    w = w.copy()
    w[c:2 * c] = w[0:c]  # modalities 0 and 1 enter the fusion identically...
    x = x.copy()
    x[:, 1] = x[:, 0]    # ...and carry the same inputs
    bg = bg.copy()
    bg[:, 1] = bg[:, 0]
    phi = exact_shapley(softmax_fusion(w), x, bg, np.ones(4, bool), "prob")
    np.testing.assert_allclose(phi[:, 0], phi[:, 1], atol=1e-12)
    assert np.abs(phi[:, 0]).sum() > 1e-3


def test_ignored_modality_gets_zero(problem):
    _, x, bg, y, w = problem
    c = x.shape[2]
    w = w.copy()
    w[2 * c:3 * c] = 0.0  # the fusion ignores modality 2
    phi = exact_shapley(softmax_fusion(w), x, bg, np.ones(4, bool), "loglik", y)
    np.testing.assert_allclose(phi[:, 2], 0.0, atol=1e-12)
    assert modality_scores(phi)[2] < 1e-10 < modality_scores(phi)[0]


def test_permutation_estimate_close_to_exact(problem):
    f, x, bg, y, _ = problem
    mask = np.ones(4, bool)
    exact = exact_shapley(f, x, bg, mask, "prob")
    est, se = permutation_shapley(f, x, bg, mask, "prob", permutations=400, seed=3)
    assert np.all(np.abs(est - exact) <= 5 * se + 1e-9)
    # 4 players have only 24 orders; the estimate is tight
    assert np.abs(est - exact).max() < 0.02


def test_matrix_form_matches_definition():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2**3, 2))
    v[0] = 0
    phi = shapley_from_coalition_values(v)
    np.testing.assert_allclose(phi.sum(0), v[-1] - v[0])
    assert coalition_masks(3).shape == (8, 3)


def test_equals_shap_exact_explainer(problem):
    """Runs wherever the [test] extra is installed: a missing shap fails here instead of skipping (it
    used pytest.importorskip, so CI without shap passed silently)."""
    import shap  # in the [test] extra (pyproject.toml): never skipped
    f, x, bg, y, _ = problem
    n, m, c = x.shape
    table = np.concatenate([x, bg])  # row i < n: explained sample i; row n + b: background b

    def g(idx):
        idx = np.asarray(idx, dtype=int)
        z = table[idx, np.arange(m)[None, :]]
        return f(z, None)

    explained = np.repeat(np.arange(n)[:, None], m, 1)
    background = np.repeat(np.arange(n, n + len(bg))[:, None], m, 1)
    masker = shap.maskers.Independent(background, max_samples=len(bg))
    sv = shap.explainers.Exact(g, masker)(explained).values  # (n, m, c)
    ours = exact_shapley(f, x, bg, np.ones(m, bool), "prob")
    np.testing.assert_allclose(ours, sv, atol=1e-6)


def test_coalition_values_shapes(problem):
    f, x, bg, y, _ = problem
    v = coalition_values(f, x, bg, np.array([0, 2]), np.array([1, 0, 1, 0], bool), "loglik", y)
    assert v.shape == (4, x.shape[0])


def test_gains_count_a_harmful_contribution_against_the_modality():
    """Issue 8: |phi| rewards a modality whose contribution is large and harmful as much as one that
    helps. Two modalities, two classes: the fusion follows modality 0 (right) and is pulled to the
    wrong class by modality 1 (noise it trusts). |phi| scores both high; the signed gain puts the
    harmful one below 0."""
    from fedmfs.core.shapley import exact_shapley, modality_gains, modality_scores

    y = np.array([0, 1, 0, 1])
    x = np.zeros((4, 2, 2), np.float32)
    x[np.arange(4), 0, y] = 1.0            # modality 0 says the true class
    x[np.arange(4), 1, 1 - y] = 1.0        # modality 1 says the other one
    bg = np.full((3, 2, 2), 0.5, np.float32)

    def fusion(z, mask):
        logits = 2.0 * z[:, 0] + 1.5 * z[:, 1]
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    phi = exact_shapley(fusion, x, bg, np.array([True, True]), "loglik", y)
    abs_scores, gains = modality_scores(phi), modality_gains(phi)
    assert abs_scores[1] > 0.5 * abs_scores[0]            # |phi| calls the harmful modality impactful
    assert gains[0] > 0 > gains[1]                         # the gain ranks it below 0
    np.testing.assert_allclose(gains.sum(), phi.sum(1).mean())   # efficiency: gains sum to the total
    with pytest.raises(ValueError, match="per-sample"):
        modality_gains(np.zeros((4, 2, 2)))


def test_the_lower_bound_gain_puts_a_noisy_contribution_below_a_small_sure_one():
    """Issue 8: a pure-noise modality the fusion leans on helps some windows by chance and hurts others;
    its mean gain is a coin toss around 0 and could beat a weak informative modality. Its lower bound
    (mean minus two standard errors) cannot."""
    from fedmfs.core.shapley import modality_gains

    rng = np.random.default_rng(0)
    n = 60
    sure = 0.05 + 0.01 * rng.standard_normal(n)       # helps a little, every window
    noisy = 0.5 * rng.standard_normal(n)
    noisy += 0.08 - noisy.mean()                        # by chance a higher mean than `sure`
    phi = np.stack([sure, noisy], axis=1)
    mean = modality_gains(phi)
    assert mean[1] > mean[0]
    lcb = modality_gains(phi, lower_bound=True)
    assert lcb[0] > 0 > lcb[1]
    se = phi.std(axis=0, ddof=1) / np.sqrt(n)
    np.testing.assert_allclose(lcb, phi.mean(0) - 2 * se)
    np.testing.assert_allclose(modality_gains(phi[:1], lower_bound=True), phi[0])   # one sample: no spread
