import pytest
import torch

from lmmlab import allocate
from lmmlab.tasks import shapes as data
from lmmlab.calibrate import calibrate


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
    from lmmlab.prune import score

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
