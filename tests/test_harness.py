"""lm-eval adapter: local YAML tasks over JSONL files, scored on the tiny Llama, checked against direct computations
(a plain forward pass; token-by-token decoding through the same quantized cache). Offline: no hub, no dataset hub."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="the harness extra (lm-eval) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from lmmlab.tasks.harness import HarnessLM, evaluate_harness  # noqa: E402
from lmmlab.kv.cache import KVCache  # noqa: E402
from lmmlab.models import load_model  # noqa: E402

# Words the tiny Llama's word-level tokenizer knows (lmmlab.tasks.shapes.vocabulary); every context is longer than
# the 8-token residual window below, so the 2-bit cache really quantizes some of it.
MC = [
    ("USER: is there a red circle at the top or the bottom ? ASSISTANT:", ["top", "bottom"], 0),
    ("USER: what colour is the small square on the left ? ASSISTANT:", ["red", "blue", "green", "white"], 1),
    ("USER: how many shapes are there on the right ? ASSISTANT:", ["0", "1", "2", "3", "4"], 2),
    ("USER: is the large triangle on the left or the right ? ASSISTANT:", ["left", "right"], 1),
    ("USER: is there a purple diamond at the bottom ? ASSISTANT:", ["yes", "no"], 0),
    ("USER: what colour is the cross at the top ? ASSISTANT:", ["yellow", "purple", "green"], 2),
]
TEXTS = [f"{q} {choices[label]}" for q, choices, label in MC]
GEN = [(q, choices[label]) for q, choices, label in MC[:3]]
LAYERS, GROUP, WINDOW = 3, 8, 8  # tiny Llama: 3 layers, head_dim 16 (hidden 64 / 4 heads)


def _yaml(name: str, data, body: str, cache_dir) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache_dir}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def offline():
    """No hub: the environment variables, and the constants huggingface_hub and datasets read them into at import."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three local lm-eval tasks: multiple choice (acc), rolling log-likelihood (perplexity), generation."""
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    cache = d / "hf-datasets"
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in MC))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN))
    (d / "toy_mc.yaml").write_text(_yaml("toy_mc", d / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
        cache))
    (d / "toy_ppl.yaml").write_text(_yaml("toy_ppl", d / "text.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"), cache))
    (d / "toy_gen.yaml").write_text(_yaml("toy_gen", d / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['?']\n  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"), cache))
    return d


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir, device="cpu")


def _quantized_2bit():
    return KVCache([2] * LAYERS, GROUP, WINDOW)


class Recorder:
    """A cache factory that keeps what it made, to check the caches really quantized tokens."""

    def __init__(self, make):
        self.make, self.made = make, []

    def __call__(self):
        self.made.append(self.make())
        return self.made[-1]


@pytest.fixture(scope="module")
def runs(loaded, task_dir, offline):
    """evaluate_harness on the three tasks: plain DynamicCache, a 16-bit KVCache, a 2-bit KVCache (group 8, window 8),
    and the 2-bit cache again one request per forward pass."""
    two_bit = Recorder(_quantized_2bit)
    tasks = ["toy_mc", "toy_ppl", "toy_gen"]
    common = dict(include_path=task_dir, include_defaults=False)
    out = {
        "dynamic": evaluate_harness(loaded, tasks, **common),
        "16-bit": evaluate_harness(loaded, tasks, make_cache=lambda: KVCache([16] * LAYERS), **common),
        "2-bit": evaluate_harness(loaded, tasks, make_cache=two_bit, **common),
        "2-bit batch 1": evaluate_harness(loaded, ["toy_mc", "toy_ppl"], make_cache=_quantized_2bit, batch_size=1,
                                          limit=3, **common),
    }
    out["2-bit caches"] = two_bit.made
    return out


# --- direct computations ---------------------------------------------------------------------------------------

def _ids(loaded, text: str, special: bool = True) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=special).input_ids


def _pair(loaded, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids (BOS first) and the continuation's ids, as one string is split (lm-eval's causal encoding)."""
    ctx, whole = _ids(loaded, context), _ids(loaded, context + continuation)
    assert whole[: len(ctx)] == ctx
    return ctx, whole[len(ctx):]


@torch.no_grad()
def plain_loglikelihood(loaded, ctx: list[int], cont: list[int]) -> float:
    """Σ log p(continuation | context) from one forward pass over the whole sequence, no cache."""
    logits = loaded.model(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
    return float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())


@torch.no_grad()
def decoded_loglikelihood(loaded, ctx: list[int], cont: list[int], cache) -> float:
    """The same, with all but the context's last token prefilled into `cache` and every later token fed one at a
    time through it (what generation would see)."""
    model = loaded.model
    if len(ctx) > 1:
        model(input_ids=torch.tensor([ctx[:-1]]), cache=cache, use_cache=True)
    total, fed = 0.0, ctx[-1:] + cont[:-1]
    for token, target in zip(fed, cont):
        logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1].float()
        total += float(torch.log_softmax(logits, -1)[target])
    return total


def mc_scores(loaded, score) -> list[list[float]]:
    return [[score(*_pair(loaded, q, " " + c)) for c in choices] for q, choices, _ in MC]


def text_scores(loaded, score) -> list[float]:
    bos = loaded.tokenizer.bos_token_id
    return [score([bos], _ids(loaded, t, special=False)) for t in TEXTS]


def harness_mc(result) -> list[list[float]]:
    docs = sorted(result["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    return [[ll for ll, _ in s["filtered_resps"]] for s in docs]


def harness_texts(result) -> list[float]:
    return [s["filtered_resps"][0] for s in sorted(result["samples"]["toy_ppl"], key=lambda s: s["doc_id"])]


def close(a, b, tol: float = 1e-4) -> bool:
    return torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol)


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


# --- tests -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dynamic", "16-bit"])
def test_multiple_choice_matches_a_plain_forward(runs, loaded, kind):
    direct = mc_scores(loaded, lambda ctx, cont: plain_loglikelihood(loaded, ctx, cont))
    got = harness_mc(runs[kind])
    assert close(_flat(got), _flat(direct))
    predicted = [max(range(len(row)), key=row.__getitem__) for row in direct]
    accuracy = sum(p == label for p, (_, _, label) in zip(predicted, MC)) / len(MC)
    assert runs[kind]["results"]["toy_mc"]["acc,none"] == pytest.approx(accuracy)


@pytest.mark.parametrize("kind", ["dynamic", "16-bit"])
def test_rolling_loglikelihood_matches_a_plain_forward(runs, loaded, kind):
    direct = text_scores(loaded, lambda ctx, cont: plain_loglikelihood(loaded, ctx, cont))
    got = harness_texts(runs[kind])
    assert close(got, direct)
    words = sum(len(t.split()) for t in TEXTS)  # lm-eval's word perplexity: exp(−Σ log-likelihood / words)
    expected = torch.exp(-torch.tensor(direct, dtype=torch.float64).sum() / words).item()
    assert runs[kind]["results"]["toy_ppl"]["word_perplexity,none"] == pytest.approx(expected, rel=1e-4)


def test_2bit_cache_changes_loglikelihoods_as_token_by_token_decoding_does(runs, loaded):
    result = runs["2-bit"]
    assert all(q > 0 for cache in runs["2-bit caches"] for q in cache.quantized_tokens())
    plain_mc = mc_scores(loaded, lambda ctx, cont: plain_loglikelihood(loaded, ctx, cont))
    decoded_mc = mc_scores(loaded, lambda ctx, cont: decoded_loglikelihood(loaded, ctx, cont, _quantized_2bit()))
    plain_text = text_scores(loaded, lambda ctx, cont: plain_loglikelihood(loaded, ctx, cont))
    decoded_text = text_scores(loaded, lambda ctx, cont: decoded_loglikelihood(loaded, ctx, cont, _quantized_2bit()))
    assert not close(_flat(harness_mc(result)), _flat(plain_mc), tol=1e-3)
    assert not close(harness_texts(result), plain_text, tol=1e-3)
    assert close(_flat(harness_mc(result)), _flat(decoded_mc))
    assert close(harness_texts(result), decoded_text)


def test_batching_does_not_change_quantized_scores(runs):
    one = runs["2-bit batch 1"]
    assert close(_flat(harness_mc(one)), _flat(harness_mc(runs["2-bit"])[:3]))
    assert close(harness_texts(one), harness_texts(runs["2-bit"])[:3])
    assert len(one["samples"]["toy_mc"]) == 3


def test_a_right_padded_continuation_scores_as_it_does_alone_under_a_2bit_cache(loaded):
    """A short continuation beside a long one is right-padded; pads quantized in the long one's chunks (the window
    flushes mid-padding) are read only by later pads, so the short one scores as alone, as decoded token by token."""
    lm = HarnessLM(loaded, make_cache=_quantized_2bit)
    ctx, short = _pair(loaded, MC[0][0], " top")
    long = _ids(loaded, " top or the bottom ? is there a red circle at the top or the bottom", special=False)
    assert len(long) >= 2 * WINDOW and len(short) < WINDOW
    (alone, _), = lm._loglikelihood_tokens([(None, ctx, short)], disable_tqdm=True)
    (beside, _), (long_ll, _) = lm._loglikelihood_tokens([(None, ctx, short), (None, ctx, long)], disable_tqdm=True)
    assert beside == pytest.approx(alone, rel=1e-6, abs=1e-6)  # a 2-row product may round apart from a 1-row one
    assert alone == pytest.approx(decoded_loglikelihood(loaded, ctx, short, _quantized_2bit()), abs=1e-4)
    assert long_ll == pytest.approx(decoded_loglikelihood(loaded, ctx, long, _quantized_2bit()), abs=1e-4)


@torch.no_grad()
def _greedy(loaded, question: str, max_new: int, stop: str) -> str:
    ids = _ids(loaded, question)
    new = []
    for _ in range(max_new):
        token = int(loaded.model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        new.append(token)
        text = loaded.tokenizer.decode(new, skip_special_tokens=True)
        if stop in text:
            return text[: text.index(stop)]
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["dynamic", "16-bit"])
def test_generate_until_matches_greedy_decoding_without_cache(runs, loaded, kind):
    docs = sorted(runs[kind]["samples"]["toy_gen"], key=lambda s: s["doc_id"])
    direct = [_greedy(loaded, q, 6, "?") for q, _ in GEN]
    assert [s["filtered_resps"][0] for s in docs] == direct
    exact = sum(d.strip() == a for d, (_, a) in zip(direct, GEN)) / len(GEN)
    assert runs[kind]["results"]["toy_gen"]["exact_match,none"] == pytest.approx(exact)


def test_empty_context_is_conditioned_on_bos(loaded):
    lm = HarnessLM(loaded)
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("", "is there a circle"), 0)],
                                     disable_tqdm=True)
    bos = loaded.tokenizer.bos_token_id
    assert ll == pytest.approx(plain_loglikelihood(loaded, [bos], _ids(loaded, "is there a circle", False)), abs=1e-4)
    assert isinstance(greedy, bool)


def test_bad_input_is_one_clear_error(loaded, task_dir, offline):
    with pytest.raises(ValueError, match="toy_nope"):
        evaluate_harness(loaded, ["toy_nope"], include_path=task_dir, include_defaults=False)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        evaluate_harness(loaded, ["toy_mc"], include_path=task_dir / "no-such-folder", include_defaults=False)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_harness(loaded, "toy_mc", include_path=task_dir, include_defaults=False)
    with pytest.raises(ValueError, match="batch_size"):
        HarnessLM(loaded, batch_size=0)
    lm = HarnessLM(loaded)
    with pytest.raises(ValueError, match="do_sample"):
        lm.generate_until([Instance("generate_until", {}, ("is there", {"do_sample": True, "temperature": 1.0}), 0)])
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([Instance("generate_until", {}, ("is there", {"max_gen_toks": 500}), 0)])


def test_scores_the_language_model_of_a_llava(tiny_llava_dir):
    llava = load_model(tiny_llava_dir, device="cpu")
    lm = HarnessLM(llava, make_cache=lambda: KVCache([16] * llava.num_layers))
    question = "USER: what colour is the small square on the left ? ASSISTANT:"
    requests = [Instance("loglikelihood", {}, (question, " " + c), i) for i, c in enumerate(["red", "blue"])]
    got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert close(got, [plain_loglikelihood(llava, *_pair(llava, question, " " + c)) for c in ["red", "blue"]])
