import torch
from transformers import DynamicCache

from lmmlab import data
from lmmlab.evaluate import answer_loss, cache_bytes, evaluate, generate_answers


def test_metrics_have_every_field_and_are_consistent(default):
    samples = data.split("validation", 96)
    m = evaluate(default, samples, batch_size=32)
    correct = sum(p == s.answer for p, s in zip(m.predictions, samples))
    assert m.n == 96 and m.accuracy == correct / 96
    assert set(m.accuracy_by_kind) == set(data.KINDS)
    assert 0 < m.loss < 10 and m.latency_s > 0 and m.peak_mem_bytes > 0 and m.kv_bytes > 0
    assert set(m.to_dict()) == {"accuracy", "accuracy_by_kind", "loss", "latency_s", "peak_mem_bytes", "kv_bytes", "n"}


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
