import pytest
import torch

from lmmlab import models
from lmmlab.tasks import shapes as data
from lmmlab.prune.calibrate import calibrate


def test_input_norms_match_a_direct_computation_on_a_text_model(tiny_llama_dir):
    loaded = models.load_model(tiny_llama_dir, device="cpu")
    tok = loaded.tokenizer
    batch = dict(tok(["USER: what colour is the circle ?", "is there a square ?"], return_tensors="pt", padding=True))
    stats = calibrate(loaded, [batch], gram=True)
    mask = batch["attention_mask"].bool()
    hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
    for i in range(loaded.num_layers):
        layer = loaded.layers[i]
        x = layer.input_layernorm(hidden[i])[mask]  # what q/k/v_proj see, padding dropped
        torch.testing.assert_close(stats.sq_norm[(i, "q_proj")], x.pow(2).sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.gram[(i, "k_proj")], x.T @ x, rtol=1e-4, atol=1e-4)
    assert stats.tokens == int(mask.sum())
    assert len(stats.sq_norm) == loaded.num_layers * len(models.PRUNABLE)
    only_layer_1 = calibrate(loaded, [batch], gram=[1])
    assert {k[0] for k in only_layer_1.gram} == {1} and len(only_layer_1.sq_norm) == len(stats.sq_norm)


def test_padding_does_not_change_the_statistics(default):
    samples = data.split("calibration", 6)
    together = calibrate(default, data.batches(default, samples, batch_size=6))
    alone = calibrate(default, data.batches(default, samples, batch_size=1))
    assert together.tokens == alone.tokens
    for key in together.sq_norm:
        torch.testing.assert_close(together.sq_norm[key], alone.sq_norm[key], rtol=1e-3, atol=1e-4)


def test_calibration_leaves_the_model_unchanged_and_hook_free(default):
    before = {k: v.clone() for k, v in default.model.state_dict().items()}
    calibrate(default, data.batches(default, data.split("calibration", 4)))
    assert all(torch.equal(before[k], v) for k, v in default.model.state_dict().items())
    assert not any(lin._forward_pre_hooks for i in range(default.num_layers) for lin in default.linears(i).values())


def test_empty_calibration_fails_clearly(default):
    with pytest.raises(ValueError, match="no tokens"):
        calibrate(default, [])
