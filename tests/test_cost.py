"""The per-layer decode cost model (`lmmlab.search.cost`): its byte features equal what compressing a model and
filling a cache hold, a fit recovers held-out points of a known cost within the noise put in, per-layer plans are
sums of their layers, and too few points is a one-line ValueError."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmmlab.models import Loaded, build_tokenizer, decoder_layers
from lmmlab.models.sparse_linear import compress_linears
from lmmlab.plan import CompressionPlan
from lmmlab.search import cost

TRUE = {"dense_bytes": 1 / 8e9, "sparse_bytes": 1 / 5e9, "kv16_bytes": 1 / 4e9, "kvq_bytes": 1 / 2e9,
        "layers": 2e-4, "one": 1e-3}


@pytest.fixture(scope="module")
def loaded():
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return Loaded("tiny", model, build_tokenizer(), decoder_layers(model))


def test_features_count_the_bytes_compressing_holds(loaded):
    before = cost.plan_features(loaded, CompressionPlan.uniform(4), 100)
    assert before["sparse_bytes"] == 0 and before["dense_bytes"] == cost.rest_bytes(loaded.model)
    with torch.no_grad():
        for linear in loaded.prunable().values():  # exactly 70 % zeros in every linear
            flat = linear.weight.view(-1)
            flat[flat.abs().argsort()[:round(0.7 * flat.numel())]] = 0
    plan = CompressionPlan.uniform(4, 0.7, kv_bits=4)
    features = cost.plan_features(loaded, plan, 1000)
    counts = compress_linears(loaded)
    try:
        assert features["sparse_bytes"] == counts["bytes_after"]
        assert features["dense_bytes"] == cost.rest_bytes(loaded.model)  # what is left dense: not the linears
    finally:
        from lmmlab.models.sparse_linear import decompress_linears

        decompress_linears(loaded)
    assert features["kv16_bytes"] == 0 and features["kvq_bytes"] > 0 and features["layers"] == 4


def test_a_per_layer_plan_costs_the_sum_of_its_layers(loaded):
    mixed = CompressionPlan([0.0, 0.5, 0.7, 0.7], [16, 4, 2, 16])
    f = cost.plan_features(loaded, mixed, 512)
    uniform = {s: cost.plan_features(loaded, CompressionPlan.uniform(4, s), 512) for s in (0.0, 0.5, 0.7)}
    per_layer = {s: (uniform[s]["sparse_bytes"] / 4) for s in uniform}
    assert f["sparse_bytes"] == pytest.approx(per_layer[0.5] + 2 * per_layer[0.7])
    assert f["kv16_bytes"] == pytest.approx(cost.plan_features(loaded, CompressionPlan.uniform(4), 512)
                                            ["kv16_bytes"] / 2)


def synthetic_points(loaded, noise: float, seed: int = 0):
    """(features, seconds) over sparsity × KV width × context under the cost `TRUE`, with relative noise."""
    rng = np.random.default_rng(seed)
    points = []
    for s in (0.0, 0.3, 0.5, 0.6, 0.7, 0.8):
        for bits in (16, 8, 4, 2):
            for context in (256, 1024, 2048, 4096):
                f = cost.plan_features(loaded, CompressionPlan.uniform(4, s, kv_bits=bits), context)
                t = sum(TRUE[k] * f[k] for k in cost.FEATURES)
                points.append((f, t * (1 + noise * rng.standard_normal())))
    return points


def test_the_fit_predicts_held_out_points_within_the_noise(loaded):
    points = synthetic_points(loaded, noise=0.02)
    train, held = points[::2], points[1::2]
    model = cost.fit(train)
    errors = cost.percent_errors(model, held)
    assert np.median(errors) < 3 and max(errors) < 10  # 2 % noise: held-out errors of that order
    exact = cost.fit(synthetic_points(loaded, noise=0.0))
    assert max(cost.percent_errors(exact, held)) < 8  # noise-free: the model's form is right


def test_fit_e2e_reports_held_out_error_and_round_trips(loaded, tmp_path):
    rows = []
    for f, seconds in synthetic_points(loaded, noise=0.01):
        plain = f["kv16_bytes"] > 0
        cache = f["kv16_bytes"] + f["kvq_bytes"]
        rows.append({"shape": "tiny", "plan": f"{f['sparse_bytes']:.0f}", "context": len(rows), "kv_bits":
                     16 if plain else 4, "sparsity": 0.5 if f["sparse_bytes"] else 0.0,
                     "linear_bytes": f["sparse_bytes"], "bytes_per_token": f["dense_bytes"] + f["sparse_bytes"] +
                     cache, "cache_bytes": cache, "full_depth": 4, "s_per_token": seconds,
                     "resident_bytes": 1e6, "peak_rss_bytes": 5e8})
    model, report = cost.fit_e2e(rows)
    assert report["heldout"] == len(rows) // 3 and report["heldout_error_pct"]["median"] < 3
    assert model.rss_intercept == 5e8 - 1e6 and report["peak_rss_error_pct"]["max"] < 1e-9
    model.save(tmp_path / "cost.json")
    assert cost.CostModel.load(tmp_path / "cost.json") == model


def test_too_few_points_is_refused():
    with pytest.raises(ValueError, match="at least 6 timed points; got 2"):
        cost.fit([(dict.fromkeys(cost.FEATURES, 1.0), 1.0)] * 2)


def test_the_search_takes_a_cost_model_as_its_second_objective_only_when_it_can(tmp_path):
    from lmmlab.search.per_layer import PerLayerConfig
    from lmmlab.tasks import get_task

    task = get_task("text")
    path = tmp_path / "cost_model.json"
    with pytest.raises(ValueError, match="--cost-model .*needs --multi-objective and a file"):
        PerLayerConfig(multi_objective=True, cost_model=str(path)).check(task)
    cost.CostModel(dict.fromkeys(cost.FEATURES, 1e-9)).save(path)
    with pytest.raises(ValueError, match="needs --multi-objective"):
        PerLayerConfig(cost_model=str(path)).check(task)
    assert PerLayerConfig(multi_objective=True, cost_model=str(path)).check(task) == task.direction


def test_a_multi_objective_search_minimises_the_predicted_decode_time(tiny_llama_dir, tmp_path):
    import optuna

    from lmmlab.models import load_model
    from lmmlab.search.per_layer import PerLayerConfig, search
    from lmmlab.tasks import get_task

    loaded = load_model(tiny_llama_dir, device="cpu")
    model = cost.CostModel(TRUE)
    model.save(tmp_path / "cost_model.json")
    config = PerLayerConfig(multi_objective=True, n_trials=3, n_eval=2, kv_group_size=8, kv_residual=8,
                            cost_model=str(tmp_path / "cost_model.json"), warm_start=False, context_tokens=512)
    result = search(loaded, get_task("text"), config, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="c")
    for t in result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        plan = CompressionPlan(**t.user_attrs["plan"])
        assert t.values[1] == t.user_attrs["decode_s_per_token"] == model.seconds(cost.plan_features(loaded, plan,
                                                                                                    512))
