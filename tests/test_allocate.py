import math

import pytest
import torch

from lmmlab.prune import allocate
from lmmlab.tasks import shapes as data
from lmmlab.prune.calibrate import calibrate


@pytest.fixture(scope="module")
def stats(default):
    return calibrate(default, data.batches(default, data.split("calibration", 64)))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_owl_mean_is_exactly_the_target_and_outlier_rich_layers_keep_more(default, stats, target):
    plan = allocate.owl(default, stats, target)
    assert sum(plan) / len(plan) == pytest.approx(target, abs=1e-9)
    assert all(0 <= s < 1 for s in plan)
    D = allocate.outlier_ratios(default, stats)
    order_by_outliers = sorted(range(len(D)), key=D.__getitem__)
    assert [plan[i] for i in order_by_outliers] == sorted(plan, reverse=True)
    assert max(plan) - min(plan) == pytest.approx(2 * allocate.OWL_LAMBDA, abs=1e-9)


def test_outlier_ratio_matches_its_definition(default, stats):
    from lmmlab.prune.scores import score

    i = 2
    S = torch.cat([score("wanda", lin.weight, stats.norm((i, n))).flatten() for n, lin in default.linears(i).items()])
    threshold = 5 * S.mean().item()
    expected = sum(1 for v in S.tolist() if v > threshold) / S.numel()
    assert allocate.outlier_ratios(default, stats)[i] == pytest.approx(expected)


def test_projection_keeps_the_mean_and_the_bounds():
    raw = [0.1, 0.9, 0.95, 0.99, 0.2]
    out = allocate.project(raw, 0.7)
    assert sum(out) / 5 == pytest.approx(0.7, abs=1e-9) and all(0 <= s <= 0.99 for s in out)
    assert sorted(range(5), key=out.__getitem__) == sorted(range(5), key=raw.__getitem__)
    assert allocate.uniform(3, 0.4) == [0.4, 0.4, 0.4]
    with pytest.raises(ValueError, match="outside the allowed"):
        allocate.project(raw, 1.2)


# ATP ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, target, slope", [(3, 0.5, 0.2), (30, 0.7, 0.013), (30, 0.6, -0.01), (7, 0.0, 0.0)])
def test_atp_is_linear_in_depth_with_the_target_mean(layers, target, slope):
    plan = allocate.atp(layers, target, slope)
    assert len(plan) == layers
    assert [b - a for a, b in zip(plan, plan[1:])] == pytest.approx([slope] * (layers - 1), abs=1e-12)
    assert sum(plan) / layers == pytest.approx(target, abs=1e-12)
    assert allocate.atp(layers, target, 0.0) == allocate.uniform(layers, target)


def test_atp_refuses_a_slope_that_leaves_the_range():
    assert allocate.atp_max_slope(30, 0.7) == pytest.approx(0.29 / 14.5)
    with pytest.raises(ValueError, match=r"allowed: -0\.02 <= slope <= 0\.02"):
        allocate.atp(30, 0.7, 0.021)
    with pytest.raises(ValueError, match="allowed"):
        allocate.atp(30, 0.7, -0.021)
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\)"):
        allocate.atp(30, 1.0, 0.0)
    assert allocate.atp(1, 0.4, 5.0) == [0.4]  # one layer: the slope does nothing


@pytest.mark.parametrize("layers, target", [(30, 0.7), (30, 0.3), (4, 0.5)])
def test_atp_slopes_span_zero_to_the_largest_in_range(layers, target):
    slopes = allocate.atp_slopes(layers, target, n=5)
    assert len(slopes) == 5 and slopes[0] == 0 and slopes == sorted(slopes)
    edge = allocate.atp(layers, target, slopes[-1])
    assert 0 <= min(edge) and max(edge) <= 0.99
    assert min(edge) == pytest.approx(0, abs=1e-12) or max(edge) == pytest.approx(0.99, abs=1e-12)  # tight
    with pytest.raises(ValueError, match="allowed"):
        allocate.atp(layers, target, slopes[-1] * 1.01)
    assert allocate.atp_slopes(layers, 0.0) == [0.0] and allocate.atp_slopes(1, 0.5) == [0.0]


# AlphaPruning -------------------------------------------------------------------------------------------------------

def eigenvalues_of(W: torch.Tensor) -> list[float]:
    """The eigenvalues of WᵀW, largest first, straight from its symmetric eigendecomposition (no SVD)."""
    W = W.double()
    return sorted(torch.linalg.eigvalsh(W.T @ W).tolist(), reverse=True)[:min(W.shape)]


def hill_written_out(lam: list[float], k: int) -> float:
    return 1 + k / sum(math.log(lam[i] / lam[k - 1]) for i in range(k))


def peak_written_out(lam: list[float]) -> float:
    """AlphaPruning's "alpha_peak", one candidate at a time (lam largest first)."""
    asc = sorted(lam)
    N = len(asc)
    logs = [math.log10(x) for x in asc]
    width = (logs[-1] - logs[0]) / 100
    counts = [0] * 100
    for v in logs:
        counts[min(int((v - logs[0]) / width), 99)] += 1
    peak = 10 ** (logs[0] + counts.index(max(counts)) * width)
    alphas, Ds = [0.0] * (N - 1), [1.0] * (N - 1)  # non-candidates: α = 0, D = 1
    for i in range(N - 1):
        if not math.log10(0.95 * peak) <= asc[i] <= 1.5 * peak:
            continue
        n = N - i
        alphas[i] = 1 + n / sum(math.log(asc[j] / asc[i]) for j in range(i, N))
        if alphas[i] > 1:
            Ds[i] = max(abs(1 - (asc[i + j] / asc[i]) ** (1 - alphas[i]) - j / n) for j in range(n))
    return alphas[Ds.index(min(Ds))]


def test_pl_alpha_hill_matches_a_direct_eigenvalue_computation():
    torch.manual_seed(0)
    W = torch.randn(40, 24) / 5 + torch.randn(40, 2) @ torch.randn(2, 24) / 3  # a spike or two: a real tail
    lam = eigenvalues_of(W)
    assert len(lam) == 24
    for k in (2, 5, 12, 24):
        assert allocate.pl_alpha_hill(W, k=k) == pytest.approx(hill_written_out(lam, k), rel=1e-5)
    assert allocate.pl_alpha_hill(W, xmin="mid") == pytest.approx(hill_written_out(lam, 24 - 12), rel=1e-5)
    assert allocate.pl_alpha_hill(W) == pytest.approx(peak_written_out(lam), rel=1e-5)
    assert allocate.pl_alpha_hill(3.0 * W, k=5) == pytest.approx(allocate.pl_alpha_hill(W, k=5), rel=1e-5)
    with pytest.raises(ValueError, match=r"2 <= k <= 24"):
        allocate.pl_alpha_hill(W, k=1)
    with pytest.raises(ValueError, match="allowed: peak, mid"):
        allocate.pl_alpha_hill(W, xmin="median")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from lmmlab.models import load_model

    return load_model(tiny_llama_dir, device="cpu")


def test_layer_alphas_are_the_mean_over_each_layers_linears(tiny):
    alphas = allocate.layer_alphas(tiny)
    assert len(alphas) == tiny.num_layers
    per_linear = [allocate.pl_alpha_hill(lin.weight) for lin in tiny.linears(1).values()]
    assert alphas[1] == pytest.approx(sum(per_linear) / len(per_linear))


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_alphapruning_prunes_lighter_tailed_layers_more_with_the_target_mean(tiny, target):
    alphas = allocate.layer_alphas(tiny)
    plan = allocate.alphapruning(tiny, target)
    assert sum(plan) / len(plan) == pytest.approx(target, abs=1e-9)
    assert sorted(range(len(plan)), key=plan.__getitem__) == sorted(range(len(alphas)), key=alphas.__getitem__)
    assert max(plan) / min(plan) == pytest.approx(allocate.ALPHA_S2 / allocate.ALPHA_S1)  # the ends of [s1, s2]
    assert allocate.alphapruning_from(alphas, target) == plan


def test_alphapruning_from_maps_linearly_and_projects():
    plan = allocate.alphapruning_from([2.0, 3.0, 4.0, 6.0], 0.4, s1=0.5, s2=1.5)
    ratio = [0.5, 0.75, 1.0, 1.5]  # α linearly onto [s1, s2]
    assert plan == pytest.approx([0.4 * r / (sum(ratio) / 4) for r in ratio])
    high = allocate.alphapruning_from([2.0, 3.0, 4.0, 6.0], 0.9)
    assert sum(high) / 4 == pytest.approx(0.9, abs=1e-9) and max(high) <= 0.99 and high == sorted(high)
    assert allocate.alphapruning_from([3.0, 3.0, 3.0], 0.6) == pytest.approx([0.6] * 3)


def test_alphapruning_uses_the_given_weights_not_the_models(tiny):
    dense = {(i, name): lin.weight.detach().clone() for (i, name), lin in tiny.prunable().items()}
    before = allocate.alphapruning(tiny, 0.5)
    torch.manual_seed(1)
    try:
        for lin in tiny.linears(0).values():  # give layer 0 a heavy tail: a strong low-rank part
            W = lin.weight.data
            W += torch.randn(W.shape[0], 2) @ torch.randn(2, W.shape[1]) * W.std()
        assert allocate.alphapruning(tiny, 0.5) != pytest.approx(before, abs=1e-3)
        assert allocate.alphapruning(tiny, 0.5, weights=dense) == pytest.approx(before, abs=1e-9)
    finally:
        for (i, name), W in dense.items():
            tiny.linears(i)[name].weight.data.copy_(W)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.0), r"target sparsity must be in \[0, 1\)"),
    (dict(target=-0.1), r"target sparsity must be in \[0, 1\)"),
    (dict(target=0.5, s1=1.3, s2=1.2), r"0 <= s1 <= s2 and s2 > 0"),
    (dict(target=0.5, s1=-0.1), r"0 <= s1 <= s2 and s2 > 0"),
    (dict(target=0.5, s1=0.0, s2=0.0), r"0 <= s1 <= s2 and s2 > 0"),
])
def test_alphapruning_bad_input_is_one_clear_error(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate.alphapruning(tiny, **kwargs)
