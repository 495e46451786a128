"""The text task: Wanda/SparseGPT perplexity in non-overlapping windows, fed prefill-then-chunks through a KV cache."""
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from lmmlab import models
from lmmlab.kv.cache import KVCache
from lmmlab.tasks import get_task
from lmmlab.tasks.text import (DEFAULT_SIZES, TextTask, chunk_mismatch, default_corpus, split_documents, tokenize,
                               unread_store, window_nll)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return models.load_model(tiny_llama_dir, device="cpu")


def _words_file(path, tokenizer, n_tokens: int, seed: int = 0):
    """A text of `n_tokens` in-vocabulary words drawn with `seed` (every word is one token of the tiny tokenizer)."""
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha()]
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(vocab) for _ in range(n_tokens)))
    return path


def _plain_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL of tokens 2..N of each window [B, N] from a plain forward pass, by hand: -log softmax there."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1)


# --- the metric, against a hand computation ---------------------------------------------------------------------

def test_perplexity_is_exp_mean_nll_of_a_plain_forward_on_the_split_windows(tiny, tmp_path):
    seqlen = 24
    text = _words_file(tmp_path / "words.txt", tiny.tokenizer, 10 * seqlen + 7)
    task = get_task("text", data=str(text), seqlen=seqlen, batch_size=4)
    ids = tokenize(tiny.tokenizer, text.read_text())
    assert ids.numel() == 10 * seqlen + 7  # one token per word, no special tokens
    test_windows = ids[4 * seqlen: 10 * seqlen].view(6, seqlen)  # windows 0-1 calibration, 2-3 validation, 4-9 test

    m = task.evaluate(tiny, split="test")
    hand = _plain_nll(tiny.model, test_windows)
    assert m.n == 6 and m.per_item_metric == "nll" and len(m.per_item) == 6
    assert torch.allclose(torch.tensor(m.per_item, dtype=torch.float64), hand, rtol=1e-5, atol=0)
    assert m.loss == pytest.approx(hand.mean().item(), rel=1e-5)
    assert m.primary == m.perplexity == pytest.approx(math.exp(hand.mean().item()), rel=1e-5)
    assert (m.primary_metric, m.direction, m.nll) == ("perplexity", "minimize", m.loss)
    # a plain DynamicCache holds every window token's K and V in fp32, across all layers; kv_bytes is per window
    c = tiny.text_config
    assert m.kv_bytes == c.num_hidden_layers * 2 * tiny.num_kv_heads * tiny.head_dim * seqlen * 4
    assert m.latency_s > 0 and m.peak_mem_bytes > 0


@pytest.mark.parametrize("prefill,chunk", [(1, 1), (12, 1), (23, 1), (8, 5), (16, 8), (5, 19)])
@pytest.mark.parametrize("cache", ["dynamic", "kv16"])
def test_kv_protocol_with_a_16bit_cache_equals_the_full_window_nll(tiny, prefill, chunk, cache):
    ids = torch.randint(5, len(tiny.tokenizer), (3, 24), generator=torch.Generator().manual_seed(prefill * 31 + chunk))
    made = DynamicCache(config=tiny.model.config) if cache == "dynamic" else KVCache([16] * tiny.num_layers)
    with torch.no_grad():
        nll = window_nll(tiny.model, ids, made, prefill=prefill, chunk=chunk)
    assert made.get_seq_length() == 24  # the whole window went through the cache
    assert torch.allclose(nll, _plain_nll(tiny.model, ids), rtol=1e-5, atol=0)


def test_a_llava_model_is_scored_on_text_alone(tiny_llava_dir, tmp_path):
    llava = models.load_model(tiny_llava_dir, device="cpu")
    assert llava.is_multimodal
    text = _words_file(tmp_path / "words.txt", llava.tokenizer, 10 * 16)
    task = get_task("text", data=str(text), seqlen=16, prefill=5, chunk=3)
    m = task.evaluate(llava, split="test")  # all 6 test windows, in text order
    expected = _plain_nll(llava.model, task.windows(llava.tokenizer, "test"))
    assert m.n == 6
    assert torch.allclose(torch.tensor(m.per_item, dtype=torch.float64), expected, rtol=1e-5, atol=0)


# --- the quantized cache is read, and chunks match token-by-token decoding --------------------------------------

def test_a_kivi_cache_changes_the_score_only_once_its_window_has_flushed(tiny):
    ids = torch.randint(5, len(tiny.tokenizer), (2, 32), generator=torch.Generator().manual_seed(3))
    plain = _plain_nll(tiny.model, ids)
    with torch.no_grad():
        late = KVCache([2] * tiny.num_layers, group_size=16, residual_length=32)  # flushes on the last token only
        nll_late = window_nll(tiny.model, ids, late, prefill=16, chunk=1)
        early = KVCache([2] * tiny.num_layers, group_size=16, residual_length=16)  # flushes after the prefill
        nll_early = window_nll(tiny.model, ids, early, prefill=16, chunk=1)
    assert late.quantized_tokens() == [32] * tiny.num_layers and early.quantized_tokens() == [32] * tiny.num_layers
    assert torch.allclose(nll_late, plain, rtol=1e-5, atol=0)  # nothing scored ever read the quantized store
    assert not torch.allclose(nll_early, plain, rtol=1e-4, atol=0)


@pytest.mark.parametrize("residual,seqlen,prefill,chunk,read", [
    (128, 256, 128, 16, True), (128, 128, 64, 16, False), (32, 128, 64, 16, True), (112, 128, 64, 16, True),
    (16, 32, 16, 1, True), (32, 32, 16, 1, False), (32, 33, 16, 1, True), (16, 32, 24, 8, True),
    (32, 32, 24, 8, False)])
def test_unread_store_says_when_no_scored_token_reads_the_quantized_cache(residual, seqlen, prefill, chunk, read):
    cache = KVCache([2, 16], group_size=16, residual_length=residual)
    warning = unread_store(cache, seqlen=seqlen, prefill=prefill, chunk=chunk)
    assert (warning is None) == read, warning
    assert unread_store(KVCache([16, 16], 16, residual), seqlen=seqlen, prefill=prefill, chunk=chunk) is None


def test_evaluate_warns_when_the_quantized_cache_is_never_read(tiny, tmp_path, caplog):
    text = _words_file(tmp_path / "words.txt", tiny.tokenizer, 10 * 32)
    task = get_task("text", data=str(text), seqlen=32, prefill=16, chunk=1)
    with caplog.at_level("WARNING", logger="lmmlab.tasks.text"):
        unread = task.evaluate(tiny, make_cache=lambda: KVCache([2] * tiny.num_layers, 16, 32))
    assert "no scored token reads the quantized KV cache" in caplog.text
    assert unread.per_item == pytest.approx(task.evaluate(tiny).per_item, rel=1e-5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmmlab.tasks.text"):
        task.evaluate(tiny, make_cache=lambda: KVCache([2] * tiny.num_layers, 16, 16))
    assert caplog.text == ""


def test_aligned_chunks_read_a_kivi_cache_exactly_as_token_by_token_decoding(tiny):
    ids = torch.randint(5, len(tiny.tokenizer), (2, 64), generator=torch.Generator().manual_seed(4))

    def nll(prefill, chunk):
        cache = KVCache([2] * tiny.num_layers, group_size=16, residual_length=16)
        with torch.no_grad():
            return window_nll(tiny.model, ids, cache, prefill=prefill, chunk=chunk), cache

    one, _ = nll(24, 1)
    aligned, cache = nll(24, 8)  # 24 mod 16 = 8: every flush falls on a chunk boundary
    assert chunk_mismatch(cache, prefill=24, chunk=8) is None
    # keys are stored exactly as token by token (tests/test_kvcache.py checks the stores); values slide one token at a
    # time, so a chunk's tokens read up to chunk − 1 values in full precision that decoding reads quantized: close only
    assert torch.allclose(aligned, one, rtol=1e-3, atol=0)
    misaligned, cache = nll(24, 12)
    assert "not aligned" in chunk_mismatch(cache, prefill=24, chunk=12)
    assert not torch.allclose(misaligned, one, rtol=1e-5, atol=0)


# --- data: splits, windows, calibration batches -------------------------------------------------------------------

def test_the_default_corpus_splits_whole_topics_disjointly_by_character_share():
    docs = default_corpus()
    names = split_documents(docs)
    assert sorted(sum(names.values(), [])) == sorted(docs)  # every topic in exactly one split
    total = sum(map(len, docs.values()))
    shares = {s: sum(len(docs[n]) for n in ns) / total for s, ns in names.items()}
    largest = max(map(len, docs.values())) / total  # a split boundary moves by at most half the largest topic
    for split, share in (("calibration", 0.2), ("validation", 0.2), ("test", 0.6)):
        assert abs(shares[split] - share) <= largest, (split, shares)
    assert split_documents(dict(reversed(list(docs.items())))) == names  # independent of dict order


def test_a_folder_is_split_by_file_and_a_few_files_are_joined(tiny, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(8):
        _words_file(many / f"doc{i}.txt", tiny.tokenizer, 120, seed=i)
    (many / "notes.bin").write_bytes(b"\x00\x01")  # not text: ignored
    task = TextTask(data=many, seqlen=16)
    texts = task.texts()
    assert isinstance(texts, dict)
    owners = {f"doc{i}.txt": [s for s in texts if (many / f"doc{i}.txt").read_text() in texts[s]] for i in range(8)}
    assert all(len(o) == 1 for o in owners.values()), owners
    few = tmp_path / "few"
    few.mkdir()
    for i in range(2):
        _words_file(few / f"doc{i}.md", tiny.tokenizer, 120, seed=i)
    assert isinstance(TextTask(data=few, seqlen=16).texts(), str)


def test_a_dataset_folder_as_published_maps_its_splits(tiny, tmp_path):
    """wikitext as its repository publishes it: a configuration folder of {split}-00000-of-00001.parquet files with a
    "text" column; train -> calibration, validation -> validation, test -> test, as the "wikitext2" name does."""
    import pandas as pd

    repo = tmp_path / "wikitext"
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    (repo / "README.md").write_text("# wikitext\n")
    texts = {}
    for i, split in enumerate(("train", "validation", "test")):
        lines = [_words_file(tmp_path / f"{split}{j}.txt", tiny.tokenizer, 60, seed=10 * i + j).read_text()
                 for j in range(3)]
        texts[split] = lines
        pd.DataFrame({"text": lines}).to_parquet(repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    task = TextTask(data=repo, seqlen=16)
    got = task.texts()
    assert got == {ours: "\n\n".join(texts[published]) for ours, published in
                   (("calibration", "train"), ("validation", "validation"), ("test", "test"))}
    (repo / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match="holds no 'test' split \\(it has train, validation\\)"):
        TextTask(data=repo, seqlen=16).texts()


def test_calibration_batches_are_seeded_windows_of_the_calibration_split(tiny, tmp_path):
    seqlen = 8
    text = _words_file(tmp_path / "words.txt", tiny.tokenizer, 50 * seqlen)
    task = get_task("text", data=str(text), seqlen=seqlen, batch_size=4)
    batches = task.calibration_batches(tiny, n=6, seed=1)
    assert [b["input_ids"].shape for b in batches] == [(4, seqlen), (2, seqlen)]
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    drawn = torch.cat([b["input_ids"] for b in batches])
    calibration = {tuple(w) for w in task.windows(tiny.tokenizer, "calibration").tolist()}
    assert {tuple(w) for w in drawn.tolist()} <= calibration and len(calibration) == 10
    again = torch.cat([b["input_ids"] for b in task.calibration_batches(tiny, n=6, seed=1)])
    other = torch.cat([b["input_ids"] for b in task.calibration_batches(tiny, n=6, seed=2)])
    assert torch.equal(drawn, again) and not torch.equal(drawn, other)
    everything = task.calibration_batches(tiny, n=1000, batch_size=64)  # never more windows than the split has
    assert [b["input_ids"].shape[0] for b in everything] == [10]
    assert sum(b["input_ids"].shape[0] for b in task.calibration_batches(tiny)) == 10  # default 32, capped


# --- bad input: one clear error ---------------------------------------------------------------------------------

def test_bad_data_fails_with_one_clear_error(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("text", data=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        get_task("text", data=str(tmp_path / "empty.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty"):
        get_task("text", data=str(tmp_path / "empty_dir"))
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"no non-empty \.txt or \.md file"):
        get_task("text", data=str(tmp_path / "binary")).texts()
    with pytest.raises(ValueError, match="unknown data 'wikitext103'.*wikitext2, c4"):
        get_task("text", data="wikitext103")
    short = _words_file(tmp_path / "short.txt", tiny.tokenizer, 20)
    with pytest.raises(ValueError, match="shorter than one window: 20 tokens, seqlen 32"):
        get_task("text", data=str(short), seqlen=32).evaluate(tiny)
    two = _words_file(tmp_path / "two.txt", tiny.tokenizer, 2 * 16)  # two windows cannot fill three splits
    with pytest.raises(ValueError, match="the calibration split of .* has no window"):
        get_task("text", data=str(two), seqlen=16).evaluate(tiny)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        get_task("text", data=str(two), seqlen=8).evaluate(tiny, split="train")


@pytest.mark.parametrize("options,name", [({"seqlen": 1}, "seqlen"), ({"seqlen": 16, "prefill": 0}, "prefill"),
                                          ({"seqlen": 16, "prefill": 16}, "prefill"),
                                          ({"seqlen": 16, "prefill": 8, "chunk": 0}, "chunk"),
                                          ({"seqlen": 16, "prefill": 8, "chunk": 9}, "chunk"),
                                          ({"batch_size": 0}, "batch_size"), ({"seqlen": 2.5}, "seqlen")])
def test_out_of_range_options_fail_with_one_clear_error(options, name):
    with pytest.raises(ValueError, match=rf"text task {name}=.* is out of range; allowed: an integer"):
        get_task("text", **options)


def test_defaults_fit_any_window_length():
    assert (TextTask().prefill, TextTask().chunk) == (128, 16)
    short = TextTask(seqlen=8)
    assert (short.prefill, short.chunk) == (4, 4)


@pytest.mark.slow  # starts fresh Python processes: seconds of start-up each, kept out of `make test-fast`
def test_hub_data_fails_clearly_when_datasets_or_the_hub_is_missing():
    """Offline (HF_HUB_OFFLINE=1, in a fresh process so the hub reads it): one line naming the data and the way out."""
    code = ("from lmmlab.tasks import get_task\n"
            "try:\n    get_task('text', data='wikitext2').texts()\n"
            "except ValueError as err:\n    print('ValueError:', err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    if out.startswith("ValueError:"):
        assert "--data wikitext2" in out and ("needs the optional `datasets` package" in out or "hub" in out), out
        assert len(out.strip().splitlines()) == 1
    else:  # a cached copy exists on this machine: then it loads without the hub
        assert out == "", out


# --- SmolLM2-135M: a real model ---------------------------------------------------------------------------------

def test_smollm2_dense_perplexity_is_finite_and_reproducible(smollm2):
    task = get_task("text", seqlen=128, batch_size=4)
    a = task.evaluate(smollm2, split="validation", n=4)
    b = get_task("text", seqlen=128, batch_size=4).evaluate(smollm2, split="validation", n=4)
    assert math.isfinite(a.primary) and 1 < a.primary < 200
    assert a.per_item == b.per_item and a.primary == b.primary


def test_default_corpus_windows_are_disjoint_across_splits(smollm2):
    task = TextTask()
    windows = {s: {tuple(w) for w in task.windows(smollm2.tokenizer, s).tolist()} for s in DEFAULT_SIZES}
    assert all(len(w) >= DEFAULT_SIZES[s] for s, w in windows.items())  # the defaults fit every split
    assert not windows["calibration"] & windows["validation"]
    assert not windows["calibration"] & windows["test"]
    assert not windows["validation"] & windows["test"]


def test_a_2bit_cache_raises_smollm2_perplexity_over_16bit(smollm2):
    task = get_task("text", seqlen=128, prefill=64, batch_size=4)
    layers = smollm2.num_layers
    caches = {}

    def cache(bits):
        caches[bits] = KVCache([bits] * layers, group_size=32, residual_length=32)
        return caches[bits]

    full = task.evaluate(smollm2, split="test", n=4, make_cache=lambda: cache(16))
    two = task.evaluate(smollm2, split="test", n=4, make_cache=lambda: cache(2))
    assert caches[2].quantized_tokens() == [128] * layers  # 64 prefilled + the window flushed every 32 tokens
    assert two.loss > full.loss + 0.05, (full.primary, two.primary)  # seen here: PPL 22.5 -> 25.3 over 8 windows
    assert two.kv_bytes < full.kv_bytes / 3
