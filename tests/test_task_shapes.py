"""The shapes task: generated scenes and questions, splits, and exact-match evaluation through any cache."""
import random

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from lmmlab.tasks import get_task
from lmmlab.tasks import shapes as data
from lmmlab.tasks.base import cache_bytes
from lmmlab.tasks.shapes import answer_loss, evaluate, generate_answers


def test_splits_are_deterministic_and_seeded():
    a = data.split("validation", 40)
    assert a == data.split("validation", 40)
    assert a != data.split("validation", 40, seed=1)


def test_splits_are_disjoint_by_scene():
    scenes = {name: {frozenset(s.scene) for s in data.split(name, 400)} for name in ("calibration", "validation", "test")}
    scenes["train"] = {frozenset(s.scene) for s in data.samples("train", 5000)}
    names = list(scenes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not scenes[a] & scenes[b], (a, b)
        assert all(data.scene_bucket(tuple(sc)) in data.SPLITS[a] for sc in scenes[a])


def test_kinds_are_balanced_and_answers_follow_from_the_scene():
    samples = data.split("test", 400)
    assert {k: sum(s.kind == k for s in samples) for k in data.KINDS} == {k: 100 for k in data.KINDS}
    for s in samples:
        shapes = {x.shape: x for x in s.scene}
        words = s.question.split()
        assert len(shapes) == len(s.scene) and 1 <= len(s.scene) <= data.MAX_SHAPES
        if s.kind == "count":
            assert s.answer == str(len(s.scene))
        elif s.kind == "colour":
            assert s.answer == shapes[words[4]].colour
        elif s.kind == "exists":
            assert s.answer == ("yes" if words[3] in shapes else "no")
        else:
            x = shapes[words[2]]
            expected = {"left": x.col == 0, "right": x.col == 2, "top": x.row == 0, "bottom": x.row == 2}
            assert expected[s.answer]


def test_every_answer_kind_is_represented():
    answers = {k: {s.answer for s in data.split("test") if s.kind == k} for k in data.KINDS}
    assert answers["count"] == {"1", "2", "3", "4"}
    assert answers["exists"] == {"yes", "no"}
    assert answers["position"] == {"left", "right", "top", "bottom"}
    assert answers["colour"] == set(data.COLOURS)


def test_image_shows_each_shape_in_its_cell(tmp_path):
    s = data.split("test", 1)[0]
    img = s.image()
    assert img.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    pixels = np.asarray(img)
    for shape in s.scene:
        cell = pixels[shape.row * data.CELL:(shape.row + 1) * data.CELL, shape.col * data.CELL:(shape.col + 1) * data.CELL]
        centre = cell[data.CELL // 2, data.CELL // 2]
        assert tuple(centre) == data.COLOURS[shape.colour]
    empty = {(r, c) for r in range(data.GRID) for c in range(data.GRID)} - {(x.row, x.col) for x in s.scene}
    for r, c in empty:
        assert (pixels[r * data.CELL:(r + 1) * data.CELL, c * data.CELL:(c + 1) * data.CELL] == data.BACKGROUND).all()
    img.save(tmp_path / "sample.png")
    assert (tmp_path / "sample.png").stat().st_size > 0
    assert s.question in str(s) and s.answer in str(s)


def test_shapes_differ_in_pixels():
    rendered = {
        name: np.asarray(data.render([data.Shape(name, "red", "large", 1, 1)])).tobytes() for name in data.SHAPES
    }
    assert len(set(rendered.values())) == len(data.SHAPES)
    small = np.asarray(data.render([data.Shape("circle", "red", "small", 1, 1)]))
    large = np.asarray(data.render([data.Shape("circle", "red", "large", 1, 1)]))
    assert (small != data.BACKGROUND).any(-1).sum() < (large != data.BACKGROUND).any(-1).sum()


def test_bad_split_and_kind_fail_clearly():
    with pytest.raises(ValueError, match="unknown split 'tset'.*allowed: train"):
        data.split("tset", 3)
    with pytest.raises(ValueError, match="unknown question kind"):
        data.ask(data.random_scene(random.Random(0)), "size", random.Random(0))
    with pytest.raises(ValueError, match="endless"):
        data.split("train")


def test_vocabulary_covers_every_prompt_and_answer():
    vocab = set(data.vocabulary()) | {"<image>"}
    for s in data.split("validation"):
        assert set(s.prompt.split()) <= vocab and s.answer in vocab



def test_metrics_have_every_field_and_are_consistent(default):
    samples = data.split("validation", 96)
    m = evaluate(default, samples, batch_size=32)
    correct = sum(p == s.answer for p, s in zip(m.predictions, samples))
    assert m.n == 96 and m.accuracy == correct / 96
    assert {k for k in m.values if k.startswith("accuracy_")} == {f"accuracy_{k}" for k in data.KINDS}
    assert m.per_item == [float(p == s.answer) for p, s in zip(m.predictions, samples)]
    assert 0 < m.loss < 10 and m.latency_s > 0 and m.peak_mem_bytes > 0 and m.kv_bytes > 0
    assert {"primary_metric", "primary", "direction", "accuracy", "loss", "latency_s", "peak_mem_bytes", "kv_bytes",
            "n", "per_item_metric"} <= set(m.to_dict()) and "per_item" not in m.to_dict()
    assert m.primary == m.accuracy and m.direction == "maximize"


def test_answers_do_not_depend_on_batching_or_padding(default):
    samples = data.split("validation", 24)
    one_by_one = [generate_answers(default, [s])[0][0] for s in samples]
    assert generate_answers(default, samples)[0] == one_by_one


def test_answers_match_transformers_greedy_generate(default):
    samples = data.split("validation", 16)
    inputs = data.collate(default.processor, samples)
    out = default.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = [default.tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]
    assert generate_answers(default, samples)[0] == expected


def test_generation_prefills_the_given_cache_and_decodes_from_it(default):
    made = []

    def make_cache():
        made.append(DynamicCache(config=default.model.config))
        return made[-1]

    samples = data.split("validation", 8)
    answers, nbytes = generate_answers(default, samples, make_cache)
    prompt_len = data.collate(default.processor, samples)["input_ids"].shape[1]
    assert len(made) == 1
    # prompt prefilled, then one decode step per generated token but the last (whose K/V nobody reads)
    assert made[0].get_seq_length() == prompt_len + 1
    cfg = default.text_config
    per_token = 2 * cfg.num_hidden_layers * default.num_kv_heads * default.head_dim * 4
    assert nbytes == cache_bytes(made[0]) == len(samples) * (prompt_len + 1) * per_token


def test_a_cache_that_corrupts_what_it_stores_changes_the_answers(default):
    class NoisyCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            g = torch.Generator().manual_seed(layer_idx)
            noise = lambda t: t + 3 * torch.randn(t.shape, generator=g)  # noqa: E731
            return super().update(noise(key_states), noise(value_states), layer_idx, *args, **kwargs)

    samples = data.split("validation", 64)
    clean = evaluate(default, samples)
    noisy = evaluate(default, samples, make_cache=lambda: NoisyCache(config=default.model.config))
    assert noisy.accuracy < clean.accuracy - 0.2
    assert noisy.loss > clean.loss


def test_answer_loss_is_low_for_right_answers_and_high_for_wrong_ones(default):
    samples = data.split("validation", 32)
    metrics = evaluate(default, samples)
    losses = answer_loss(default, samples)
    right = [l for l, p, s in zip(losses, metrics.predictions, samples) if p == s.answer]
    wrong_samples = [data.Sample(s.scene, s.kind, s.question, "purple" if s.answer != "purple" else "red") for s in samples]
    wrong = answer_loss(default, wrong_samples)
    assert sum(wrong) / len(wrong) > sum(right) / len(right) + 3


def test_every_answer_token_is_read_from_the_cache(default):
    """A cache that corrupts only what it *stored* earlier must change the answers: no answer token may be predicted
    from the full-precision states of its own forward pass alone."""
    class PastNoiseCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            past = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            g = torch.Generator().manual_seed(layer_idx)
            noise = lambda t: torch.cat([t[..., :past, :] + 3 * torch.randn(t[..., :past, :].shape, generator=g),  # noqa: E731
                                         t[..., past:, :]], dim=-2)
            return noise(keys), noise(values)

    samples = data.split("validation", 64)
    clean = evaluate(default, samples)
    noisy = evaluate(default, samples, make_cache=lambda: PastNoiseCache(config=default.model.config))
    assert noisy.accuracy < clean.accuracy - 0.2
    assert noisy.loss > clean.loss + 1


def test_the_task_seam_gives_the_same_answers_as_plain_generate(default):
    """Regression: the registered task scores each question as transformers' own greedy `generate` does on that
    question alone (no batching, no padding), so the seam did not change the numbers."""
    task = get_task("shapes")
    metrics = task.evaluate(default, split="test", n=48)
    assert (metrics.primary_metric, metrics.direction, metrics.n) == ("accuracy", "maximize", 48)
    samples = data.split("test", 48)
    tok = default.tokenizer
    agree = 0
    for sample, correct in zip(samples, metrics.per_item):
        inputs = data.model_inputs(default, [sample])
        out = default.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        agree += float(answer == sample.answer) == correct
    assert agree >= 47  # float rounding of a batched matrix product may flip one near-tie, never more


def test_shapes_calibration_batches_carry_images_and_masks(default):
    batches = get_task("shapes").calibration_batches(default, n=40, batch_size=16)
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    assert all({"input_ids", "attention_mask", "pixel_values"} <= set(b) for b in batches)


def test_shapes_on_a_text_only_model_fails_clearly(tiny_llama_dir):
    from lmmlab.models import load_model

    with pytest.raises(ValueError, match="needs images.*text-only model"):
        get_task("shapes").evaluate(load_model(tiny_llama_dir, device="cpu"), n=4)


def test_unknown_tasks_and_options_fail_with_what_is_allowed():
    with pytest.raises(ValueError, match="unknown task 'shape'; allowed: .*shapes"):
        get_task("shape")
    with pytest.raises(ValueError, match="unknown option\\(s\\) seqlen for task 'shapes'; allowed: batch_size"):
        get_task("shapes", seqlen=3)
