import dataclasses

import pytest
import torch

from lmmlab import models
from lmmlab.tasks import shapes as data
from lmmlab.tasks.shapes import evaluate

from conftest import TINY


def test_default_model_is_a_real_llava_with_six_decoder_layers(default):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(default.model, LlavaForConditionalGeneration)
    assert default.num_layers >= 6
    assert set(default.linears(0)) == set(models.PRUNABLE)
    assert default.model.config.image_seq_length == (data.IMAGE_SIZE // data.CELL) ** 2
    assert default.model.config.image_token_index < len(default.tokenizer)


def test_default_model_reaches_its_accuracy_on_the_test_split(default):
    metrics = evaluate(default, data.split("test"))
    assert metrics.accuracy >= 0.85, metrics
    assert min(v for k, v in metrics.values.items() if k.startswith("accuracy_")) >= 0.70, metrics


def test_save_and_load_round_trip_gives_identical_outputs(default, tmp_path):
    batch = data.split("validation", 8)
    inputs = data.collate(default.processor, batch)
    before = default.model(**inputs).logits
    models.save_atomic(default.model, default.processor, tmp_path / "copy")
    again = models.load_model(tmp_path / "copy", device="cpu")
    assert torch.equal(again.model(**data.collate(again.processor, batch)).logits, before)
    assert not list(tmp_path.glob(".copy-*")), "temporary folder left behind"


def test_building_is_deterministic_under_a_seed():
    a, _ = models.build_default(TINY)
    b, _ = models.build_default(TINY)
    c, _ = models.build_default(dataclasses.replace(TINY, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_training_is_deterministic_and_lowers_the_loss(tmp_path):
    recipe = dataclasses.replace(TINY, steps=6, warmup=2, lr=3e-3)
    a = models.load_model(models.train_default(recipe, out=tmp_path / "a", progress=False), device="cpu")
    b = models.load_model(models.train_default(recipe, out=tmp_path / "b", progress=False), device="cpu")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    untrained, _ = models.build_default(recipe)
    samples = data.split("validation", 32)
    before = evaluate(models.Loaded("untrained", untrained.eval(), a.processor, models.decoder_layers(untrained)), samples)
    assert evaluate(a, samples).loss < before.loss


def test_quick_training_batches_equal_the_processors_bit_for_bit():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lmmlab.models.toy import QuickBatches, pixel_table

    processor = models.build_processor()
    quick = QuickBatches(processor)
    assert quick.table is not None, "the task's images are at the processor's own size: one table serves"
    for split_name, seed in (("train", 1), ("test", 2)):
        batch = data.split(split_name, 40, seed=seed)
        for answers in (False, True):
            fast, reference = quick.collate(batch, answers), dict(data.collate(processor, batch, answers))
            assert fast.keys() == reference.keys() and all(torch.equal(fast[k], reference[k]) for k in fast)
    assert quick.table is not None, "it never fell back to the processor"
    # a processor that resizes is not pointwise: no table
    assert pixel_table(CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48})) is None
    # a table that disagrees with the processor is caught on the first batch, which comes from the processor
    wrong = QuickBatches(processor)
    wrong.table = wrong.table + 1.0
    batch = data.split("validation", 8)
    pixels = wrong.pixels([s.image() for s in batch])
    assert wrong.table is None and torch.equal(pixels, data.collate(processor, batch)["pixel_values"])


def test_load_model_finds_layers_of_a_tiny_llava(tiny_llava_dir):
    loaded = models.load_model(tiny_llava_dir, device="cpu")
    assert loaded.is_multimodal and loaded.num_layers == TINY.text_layers
    assert loaded.layers is loaded.model.model.language_model.layers
    assert {n: tuple(l.weight.shape) for n, l in loaded.linears(1).items()}["gate_proj"] == (TINY.text_intermediate, TINY.text_hidden)
    assert loaded.num_kv_heads == TINY.text_heads and loaded.head_dim == TINY.text_hidden // TINY.text_heads


def test_load_model_finds_layers_of_a_tiny_llama(tiny_llama_dir):
    loaded = models.load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    assert not loaded.is_multimodal and loaded.num_layers == 3
    assert loaded.layers is loaded.model.model.layers
    assert set(loaded.linears(2)) == set(models.PRUNABLE)
    assert loaded.num_kv_heads == 2 and loaded.head_dim == 16
    assert loaded.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="text-only"):
        evaluate(loaded, data.split("validation", 4))


def test_bad_model_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*lmmlab-default"):
        models.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        models.load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'float13'"):
        models.load_model(models.DEFAULT_MODEL, dtype="float13")


def test_the_cached_default_is_reused_and_a_stale_recipe_is_detected(default, tmp_path):
    import json
    import shutil

    path = models.default_model_path()
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_default(progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    assert models.cached_recipe(path)["steps"] == models.DefaultRecipe().steps
    # a copy whose recipe differs from the current one would be retrained; check the comparison, not the training
    stale = tmp_path / models.DEFAULT_MODEL
    shutil.copytree(path, stale)
    recipe = json.loads((stale / models.RECIPE_FILE).read_text())
    recipe["task_version"] = -1
    (stale / models.RECIPE_FILE).write_text(json.dumps(recipe))
    assert models.cached_recipe(stale)["task_version"] == -1
    assert not models.recipe_is_current(models.cached_recipe(stale))
    assert models.recipe_is_current(models.cached_recipe(path))
