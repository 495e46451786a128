"""Padding-proof quantized evaluation: batches hold items of one exact token length, so under a 2-bit KIVI cache an
item's answer, loss and bytes are the same alone and beside items of other lengths; and evaluation items are
distinct."""
import random

import pytest

from lmmlab.kv.cache import kv_cache_for
from lmmlab.plan import CompressionPlan
from lmmlab.tasks import shapes as data
from lmmlab.tasks.base import buckets, in_item_order
from lmmlab.tasks.shapes import answer_loss, evaluate, sample_lengths


def _two_bit(loaded):
    plan = CompressionPlan.uniform(loaded.num_layers, 0.0, kv_bits=2, kv_group_size=8, kv_residual=8)
    return lambda: kv_cache_for(plan, loaded)


def test_buckets_hold_equal_lengths_and_in_item_order_restores_the_order():
    rng = random.Random(0)
    for keys in ([rng.choice([3, 5, 9]) for _ in range(50)],
                 [(rng.choice([3, 5]), rng.choice([1, 2])) for _ in range(37)], [7], []):
        batches = buckets(keys, 4)
        assert sorted(i for b in batches for i in b) == list(range(len(keys)))  # every item once
        assert all(1 <= len(b) <= 4 and len({keys[i] for i in b}) == 1 and b == sorted(b) for b in batches)
        assert len(batches) == sum(-(-list(keys).count(k) // 4) for k in set(keys))  # full batches but the last
        results = [[("item", i) for i in b] for b in batches]
        assert in_item_order(batches, results) == [("item", i) for i in range(len(keys))]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        buckets([1, 2], 0)


def test_token_lengths_are_what_the_processor_builds(default):
    samples = data.split("validation", 24)
    for with_answers in (False, True):
        built = [data.collate(default.processor, [s], with_answers)["input_ids"].shape[1] for s in samples]
        assert sample_lengths(default.processor, samples, with_answers) == built
    assert len(set(sample_lengths(default.processor, samples))) > 1  # the questions really differ in length


def test_answer_loss_and_bytes_under_a_2bit_cache_do_not_depend_on_the_batch(default):
    make_cache = _two_bit(default)
    mixed = data.split("validation", 24)
    lengths = sample_lengths(default.processor, mixed)
    assert len(set(lengths)) > 1  # a padded batch of these would put pads into the first key groups
    together = evaluate(default, mixed, make_cache, batch_size=64)
    # Exact: beside items of other lengths, each item gives what it gives among its own length's items only.
    for n in set(lengths):
        own = [i for i, m in enumerate(lengths) if m == n]
        peers = evaluate(default, [mixed[i] for i in own], make_cache, batch_size=64)
        assert peers.predictions == [together.predictions[i] for i in own]
        assert peers.per_item_loss == [together.per_item_loss[i] for i in own]
        assert peers.per_item == [together.per_item[i] for i in own]
        assert peers.kv_bytes * len(own) == sum(
            evaluate(default, [mixed[i]], make_cache).kv_bytes for i in own)  # bytes: exact even one by one
    # Alone, a batch of one: the same answers and bytes; the loss equal up to float rounding, because CPU (and GPU)
    # matrix kernels pick their blocking by row count (a 1-row product rounds differently from a 6-row one, dense
    # cache or not), so == cannot hold across batch sizes. Padding instead moves the loss by up to 30 %.
    alone = [evaluate(default, [s], make_cache) for s in mixed]
    assert together.predictions == [m.predictions[0] for m in alone]
    assert together.kv_bytes * len(mixed) == sum(m.kv_bytes for m in alone)
    assert together.per_item_loss == pytest.approx([m.per_item_loss[0] for m in alone], rel=1e-5, abs=1e-7)
    padded = answer_loss(default, mixed, make_cache)  # the same items as one left-padded batch
    assert padded != pytest.approx([m.per_item_loss[0] for m in alone], rel=1e-3)


def test_results_come_back_in_item_order(default):
    samples = data.split("validation", 40)
    shuffled = random.Random(1).sample(samples, len(samples))
    a = evaluate(default, samples, batch_size=8)
    b = evaluate(default, shuffled, batch_size=8)
    by_sample = {s: (p, l) for s, p, l in zip(samples, a.predictions, a.per_item_loss)}
    assert [by_sample[s] for s in shuffled] == list(zip(b.predictions, b.per_item_loss))
    assert a.per_item == [float(p == s.answer) for p, s in zip(a.predictions, samples)]


@pytest.mark.parametrize("name", ["calibration", "validation", "test"])
def test_evaluation_splits_hold_distinct_items(name):
    items = data.split(name)
    assert len(items) == data.DEFAULT_SIZES[name]
    assert len({(frozenset(s.scene), s.kind, s.question) for s in items}) == len(items)
    seeded = data.split(name, 300, seed=5)
    assert len({(frozenset(s.scene), s.kind, s.question) for s in seeded}) == 300


def test_the_train_stream_is_unchanged():
    """The cached default model was trained on this stream: it keeps its repeats, draw for draw."""
    rng, expected, i = random.Random(data.SPLIT_SEEDS["train"]), [], 0
    while i < 3000:
        kind, scene = data.KINDS[i % len(data.KINDS)], data.random_scene(rng)
        if data.scene_bucket(scene) not in data.SPLITS["train"]:
            continue
        qa = data.ask(scene, kind, rng)
        if qa is not None:
            expected.append(data.Sample(scene, kind, *qa))
            i += 1
    got = list(data.samples("train", 3000))
    assert got == expected
    assert len({(frozenset(s.scene), s.kind, s.question) for s in got}) < len(got)
