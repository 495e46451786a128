"""lmms-eval adapter: lmms-eval's own scienceqa_img / pope / textvqa_val configs over the parquet fixtures that
lmmlab's benchmarks read (tests/vqa_fixtures.py), scored offline with the trained toy (dense, and pruned with a 2-bit
KV plan) and checked item by item against lmmlab's own tasks; the adapter's two request kinds on a tiny random
LLaVA against direct computations; the errors a user can cause. Skipped when lmms-eval is not installed (`make
lmms`), failed instead under CI=true."""
from __future__ import annotations

import importlib
import os
import statistics
import sys

import pytest
import torch

import vqa_fixtures as fx
from lmmlab.models import DEFAULT_MODEL, load_model
from lmmlab.plan import CompressionPlan
from lmmlab.tasks import SPLITS, get_task
from lmmlab.tasks import vqa
from lmmlab.tasks.lmms import evaluate_lmms, lmms_task_templates

# lmms-eval task -> (lmmlab task, the split lmms-eval's packaged config reads, as the lmms-lab file is named)
TASKS = {"scienceqa_img": ("scienceqa", "test"), "pope": ("pope", "test"), "textvqa_val": ("textvqa", "validation")}
N = 12  # records per benchmark


@pytest.fixture(scope="module")
def lmms_eval():
    """lmms-eval, imported; a skip that says how to install it, or a failure under CI=true."""
    try:
        import lmms_eval

        importlib.import_module("lmmlab.tasks.lmms_model")  # registers the model
    except ModuleNotFoundError as err:
        ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        (pytest.fail if ci else pytest.skip)(f"lmms-eval is not installed ({err}); run `make lmms`")
    return lmms_eval


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The vqa fixtures as lmms-lab parquet shards, one folder per benchmark: {lmms-eval task: folder}."""
    root = tmp_path_factory.mktemp("lmms-data")
    out = {}
    for task, (name, split) in TASKS.items():
        fx.write_parquet(fx.records(name, N), root / name / f"{split}-00000-of-00001.parquet")
        out[task] = root / name
    return out


def lmmlab_predictions(loaded, task_name: str, path, make_cache=None):
    """lmmlab's own task over every item of the file (its splits evaluated one by one, put back in file order)."""
    task = get_task(task_name, data=path)
    items = task.load()
    by_uid = {}
    for split in SPLITS:
        if any(item.split == split for item in items):
            m = task.evaluate(loaded, split=split, make_cache=make_cache, with_loss=False)
            by_uid.update(zip((item.uid for item in task.items(split)), m.predictions))
    return task, items, [by_uid[item.uid] for item in items]


def lmms_predictions(results: dict, task: str) -> list[str]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(samples)))
    return [s["filtered_resps"][0] for s in samples]


def compare(results: dict, loaded, data, make_cache=None) -> dict:
    """lmmlab's metrics and predictions next to lmms-eval's, per task; predictions must agree item by item."""
    table = {}
    for task, (name, _) in TASKS.items():
        ours, items, predictions = lmmlab_predictions(loaded, name, data[task], make_cache)
        theirs = lmms_predictions(results, task)
        assert theirs == predictions, task
        scores = [ours.score(p, item) for p, item in zip(predictions, items)]
        table[task] = (ours.summarize(predictions, items, scores), results["results"][task], predictions, items)
    return table


@pytest.fixture(scope="module")
def dense_run(default, data, lmms_eval, tmp_path_factory):
    results = evaluate_lmms(default, list(TASKS), data=data, cache_dir=tmp_path_factory.mktemp("hf-datasets"))
    return results, compare(results, default, data)


def test_lmms_eval_scores_the_fixtures_as_lmmlabs_tasks_do(dense_run, data):
    """Same prompts, same greedy answers, item by item (the adapter decodes through lmmlab's own engine; lmmlab's
    tasks stop at 16 new tokens, lmms-eval's configs at 16 / 128 / 1024, and the toy's answers end well before).
    The metrics then agree where the two define them alike:
      textvqa_val exact_match = lmmlab's vqa_accuracy (both EvalAI's normalisation and leave-one-out VQA accuracy);
      scienceqa_img exact_match = lmmlab's accuracy while no answer is "(B) ..." or "The answer is B", which only
        lmmlab reads as a letter (LLaVA's eval_science_qa); lmms-eval takes a bare letter or "B." alone (the toy
        never answers with a letter, so both are 0 here: the next test compares the two scorers on written answers);
      pope accuracy / precision / recall / F1 = lmmlab's while every answer is exactly "yes" or "no": lmms-eval
        compares the lowered answer with the label, lmmlab reads it as LLaVA's eval_pope does ("Yes, there is"
        is yes). The toy trains to other weights on another CPU and may add a word ("no left"): bare answers are then
        compared item by item, the aggregates only when every answer is bare. pope_yes_ratio is lmms-eval's share of
        "yes" *labels* (its aggregation counts ground truth), while lmmlab's yes_ratio is the share of "yes" answers,
        as LLaVA's eval_pope prints it."""
    _, table = dense_run
    ours, theirs, _, _ = table["textvqa_val"]
    assert theirs["exact_match,none"] == pytest.approx(ours["vqa_accuracy"], abs=1e-12)
    assert 0 < ours["vqa_accuracy"] < 1  # not a trivial agreement

    ours, theirs, predictions, items = table["scienceqa_img"]
    assert not [p for p in predictions if p.startswith("(") or "The answer is" in p]
    assert theirs["exact_match,none"] == pytest.approx(ours["accuracy"], abs=1e-12)

    from lmms_eval.tasks.pope.utils import pope_process_results

    ours, theirs, predictions, items = table["pope"]
    assert theirs["pope_yes_ratio,none"] == pytest.approx(statistics.fmean(i.answers[0] == "yes" for i in items))
    bare = [p in ("yes", "no") for p in predictions]
    assert sum(bare) >= len(bare) // 2, predictions  # the toy answers POPE's questions with yes or no, mostly
    task, docs = get_task("pope", data=data["pope"]), fx.records("pope", N)
    for doc, item, p, is_bare in zip(docs, items, predictions, bare):
        if is_bare:
            assert pope_process_results(doc, [p])["pope_accuracy"]["score"] == task.score(p, item) == float(
                p == item.answers[0])
    if all(bare):
        for metric in ("accuracy", "precision", "recall"):
            assert theirs[f"pope_{metric},none"] == pytest.approx(ours[metric], abs=1e-12)
        assert theirs["pope_f1_score,none"] == pytest.approx(ours["f1"], abs=1e-12)
        assert ours["yes_ratio"] == pytest.approx(statistics.fmean(p == "yes" for p in predictions))


def test_the_two_scorers_differ_only_where_the_docstring_above_says(lmms_eval, data):
    """The toy answers no ScienceQA question with a letter (both score 0.00), so the scorers are compared on written
    answers: lmms-eval's own process_results against lmmlab's task.score on every fixture item. ScienceQA: alike for
    a bare letter (any case) and "B." / "B. text"; "(B) text" and "The answer is B." count only for lmmlab. POPE:
    alike for "yes", "Yes", "no", "No"; "Yes, there is." and "No, there is not." count only for lmmlab; "NO" is no for
    lmms-eval (it lowers the answer) and yes for lmmlab (LLaVA's eval_pope looks for the words No, no, not)."""
    from lmms_eval.tasks.pope.utils import pope_process_results
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results

    task = get_task("scienceqa", data=data["scienceqa_img"])
    docs, items = fx.records("scienceqa", N), task.load()
    assert [chr(ord("A") + d["answer"]) for d in docs] == [i.answers[0] for i in items]  # the same, in file order
    for doc, item in zip(docs, items):
        right, wrong = item.answers[0], "A" if item.answers[0] != "A" else "B"
        for letter in (right, wrong):
            alike = [letter, letter.lower(), f"{letter}.", f"{letter}. {doc['choices'][0]}"]
            for p in alike:
                assert sqa_process_results(doc, [p])["exact_match"] == task.score(p, item) == float(letter == right)
            for p in (f"({letter}) {doc['choices'][0]}", f"The answer is {letter}."):
                assert (sqa_process_results(doc, [p])["exact_match"], task.score(p, item)) == (0.0, letter == right)

    task = get_task("pope", data=data["pope"])
    docs, items = fx.records("pope", N), task.load()
    assert [d["answer"] for d in docs] == [i.answers[0] for i in items]
    for doc, item in zip(docs, items):
        for p in ("yes", "no", "Yes", "No "):
            assert pope_process_results(doc, [p])["pope_accuracy"]["score"] == task.score(p, item)
        for p, said in (("Yes, there is.", "yes"), ("No, there is not.", "no")):
            assert pope_process_results(doc, [p])["pope_accuracy"]["score"] == 0.0
            assert task.score(p, item) == float(said == doc["answer"])
        assert pope_process_results(doc, ["NO"])["pope_accuracy"]["score"] == float(doc["answer"] == "no")
        assert task.score("NO", item) == float(doc["answer"] == "yes")  # eval_pope's words: "No", "no", "not"


def test_a_pruned_toy_with_a_2bit_kv_plan_answers_as_lmmlab_does(default, data, lmms_eval, tmp_path):
    """A compressed model: the toy pruned to 50 % (Wanda) with keys and values at 2 bits (groups of 4, an 8-token
    window, so the 28-token prompts really quantize); lmms-eval through the plan's per-layer cache gives every item
    the answer lmmlab's tasks give through the same cache."""
    from lmmlab.kv.cache import KVCacheFactory
    from lmmlab.prune.pruner import Pruner

    loaded = load_model(DEFAULT_MODEL, device="cpu")  # a copy of its own: pruned in place
    plan = CompressionPlan.uniform(loaded.num_layers, 0.5, kv_bits=2, method="wanda", kv_group_size=4, kv_residual=8)
    Pruner.for_task(loaded, get_task("shapes"), n=16).apply(plan)
    results = evaluate_lmms(loaded, list(TASKS), data=data, plan=plan, cache_dir=tmp_path / "hf")
    factory = KVCacheFactory(plan, loaded)
    table = compare(results, loaded, data, make_cache=factory)
    assert min(factory.last.quantized_tokens()) > 0 and min(factory.last.quantized_value_tokens()) > 0
    ours, theirs, _, _ = table["textvqa_val"]
    assert theirs["exact_match,none"] == pytest.approx(ours["vqa_accuracy"], abs=1e-12)


# --- the adapter's requests, against direct computations (tiny random LLaVA) -----------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    return load_model(tiny_llava_dir, device="cpu")


@pytest.fixture(scope="module")
def docs():
    return [{"image": fx.shapes.split("test", 3, seed=1)[i].image(), "question": q}
            for i, q in enumerate(["what colour is the circle ?", "how many shapes are there ?", "is there a square ?"])]


def requests(lmms_eval, kind: str, docs, args_of) -> list:
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=kind, arguments=(*args_of(doc), lambda d: [d["image"]], i, "toy", "test"), idx=0,
                     metadata={"task": "toy", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


def adapter(lmms_eval, loaded, docs, **options):
    from lmmlab.tasks.lmms_model import LmmlabLMMS

    model = LmmlabLMMS(loaded, **options)
    model.task_dict = {"toy": {"test": docs}}
    return model


@torch.no_grad()
def direct_greedy(loaded, prompt: str, image, steps: int) -> str:
    inputs = loaded.processor(images=[image], text=[prompt], return_tensors="pt")
    ids, out = inputs["input_ids"], []
    for _ in range(steps):
        token = loaded.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1].argmax().item()
        if token == loaded.tokenizer.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return loaded.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_generate_until_is_greedy_decoding_of_lmmlabs_prompt(lmms_eval, tiny, docs):
    model = adapter(lmms_eval, tiny, docs, batch_size=2)
    reqs = requests(lmms_eval, "generate_until", docs, lambda d: (d["question"], {"max_new_tokens": 4}))
    answers = model.generate_until(reqs)
    prompts = [vqa.prompt_text(tiny.processor, d["question"]) for d in docs]
    assert answers == [direct_greedy(tiny, p, d["image"], 4) for p, d in zip(prompts, docs)]
    alone = [adapter(lmms_eval, tiny, docs, batch_size=1).generate_until([r])[0] for r in reqs]
    assert alone == answers
    word = next((a.split()[1] for a in answers if len(a.split()) > 1), None)
    if word is not None:  # a stop string cuts the answer before it
        stopped = model.generate_until(requests(lmms_eval, "generate_until", docs,
                                                lambda d: (d["question"], {"max_new_tokens": 4, "until": [word]})))
        assert stopped == [a[: a.index(word)].strip() if word in a else a for a in answers]


def test_generate_until_refuses_sampling_and_beams(lmms_eval, tiny, docs):
    model = adapter(lmms_eval, tiny, docs)
    for kwargs, match in (({"do_sample": True, "temperature": 0.7}, "sampling"), ({"num_beams": 3}, "beam"),
                          ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            model.generate_until(requests(lmms_eval, "generate_until", docs[:1], lambda d: (d["question"], kwargs)))


@torch.no_grad()
def test_loglikelihood_is_the_continuations_log_probability(lmms_eval, tiny, docs):
    from lmmlab.kv.cache import KVCache

    for make_cache in (None, lambda: KVCache([16] * tiny.num_layers)):
        model = adapter(lmms_eval, tiny, docs, make_cache=make_cache)
        got = model.loglikelihood(requests(lmms_eval, "loglikelihood", docs, lambda d: (d["question"], "red circle")))
        for (logprob, greedy), doc in zip(got, docs):
            prompt = vqa.prompt_text(tiny.processor, doc["question"])
            full = tiny.processor(images=[doc["image"]], text=[f"{prompt} red circle"], return_tensors="pt")
            n = len(tiny.tokenizer(f"{prompt} red circle").input_ids) - len(tiny.tokenizer(prompt).input_ids)
            logits = tiny.model(**full).logits[0, -n - 1:-1].float().log_softmax(-1)
            target = full["input_ids"][0, -n:]
            assert logprob == pytest.approx(logits.gather(-1, target[:, None]).sum().item(), rel=1e-4)
            assert greedy == bool((logits.argmax(-1) == target).all())


# --- registration and errors --------------------------------------------------------------------------------------

def test_the_model_is_registered_with_lmms_eval(lmms_eval):
    from lmms_eval.api.registry import get_model

    from lmmlab.tasks.lmms import LmmlabLMMS

    assert get_model("lmmlab") is LmmlabLMMS


def test_every_template_includes_a_config_the_installed_lmms_eval_ships(lmms_eval):
    import lmms_eval.tasks
    from pathlib import Path

    root = Path(lmms_eval.tasks.__file__).parent
    assert set(lmms_task_templates()) == set(TASKS)
    assert all((root / rel).is_file() for rel in lmms_task_templates().values())


@pytest.mark.parametrize("tasks", [["mmmu"], ["pope", "scienceqa"], "pope", []])
def test_unknown_task_names_fail_with_one_line_naming_the_available_ones(tasks):
    # The names are checked before lmms-eval is imported: this runs without it too.
    with pytest.raises(ValueError, match=r"pope, scienceqa_img, textvqa_val") as err:
        evaluate_lmms(None, tasks, data={})
    assert "\n" not in str(err.value)
    if tasks == ["mmmu"]:
        assert str(err.value) == "unknown lmms-eval task(s) 'mmmu'; available: pope, scienceqa_img, textvqa_val"


def test_bad_data_fails_clearly(lmms_eval, tiny, data, tmp_path):
    with pytest.raises(ValueError, match=r"no data for textvqa_val: pass data=\{'textvqa_val': PATH\}"):
        evaluate_lmms(tiny, ["pope", "textvqa_val"], data={"pope": data["pope"]})
    with pytest.raises(ValueError, match="data must map each task"):
        evaluate_lmms(tiny, ["pope", "textvqa_val"], data=data["pope"])
    with pytest.raises(ValueError, match=r"data names task\(s\) 'scienceqa' that are not evaluated"):
        evaluate_lmms(tiny, ["pope"], data={"pope": data["pope"], "scienceqa": data["pope"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_lmms(tiny, ["pope"], data=tmp_path / "nowhere")
    (tmp_path / "pope.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="is not a .parquet file"):
        evaluate_lmms(tiny, ["pope"], data=tmp_path / "pope.jsonl")


def test_a_text_only_model_or_a_plan_that_does_not_fit_is_refused(lmms_eval, tiny, tiny_llama_dir, data):
    with pytest.raises(ValueError, match="need a multimodal model"):
        evaluate_lmms(load_model(tiny_llama_dir, device="cpu"), ["pope"], data=data["pope"])
    with pytest.raises(ValueError):
        evaluate_lmms(tiny, ["pope"], data=data["pope"], plan=CompressionPlan.uniform(tiny.num_layers + 1, kv_bits=2))


def test_without_lmms_eval_the_error_says_make_lmms(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as when it is not installed
    monkeypatch.delitem(sys.modules, "lmms_eval.api.model", raising=False)
    monkeypatch.delitem(sys.modules, "lmmlab.tasks.lmms_model", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"needs lmms-eval \(missing module 'lmms_eval'\): run `make lmms`"):
        evaluate_lmms(None, ["pope"], data={})


# --- the command ---------------------------------------------------------------------------------------------------

def test_the_command_scores_a_compressed_model_and_writes_its_answers(lmms_eval, tiny_llava_dir, data, tmp_path,
                                                                       capsys):
    """`lmmlab lmms-eval` on a tiny LLaVA pruned to a plan (Wanda 50 %, KV 4 bits): the printed metrics and the JSON
    are lmms-eval's, one answer per document."""
    from lmmlab.cli import main

    plan = tmp_path / "plan.json"
    CompressionPlan.uniform(2, 0.5, kv_bits=4, method="wanda", kv_group_size=4, kv_residual=8).save(plan)
    out = tmp_path / "scores.json"
    assert main(["lmms-eval", "--model", str(tiny_llava_dir), "--tasks", "pope", "--data", f"pope={data['pope']}",
                 "--plan", str(plan), "--calibration-task", "shapes", "--n-calibration", "8", "--limit", "4",
                 "--max-new-tokens", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(wanda 0.50, KV bits 4) on lmms-eval pope (4 documents): pope_accuracy" in printed
    written = __import__("json").loads(out.read_text())
    assert written["plan"]["kv_bits"] == [4, 4] and len(written["answers"]["pope"]) == 4
    assert 0 <= written["results"]["pope"]["pope_accuracy,none"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "mmmu", "--data", "mmmu=x"], "unknown lmms-eval task(s) 'mmmu'; available: pope, scienceqa_img, "
                                              "textvqa_val"),
    (["--tasks", "pope", "textvqa_val", "--data", "pope=x"], "no data for textvqa_val"),
    (["--tasks", "pope", "--data", "nowhere"], "does not exist"),
])
def test_the_command_refuses_bad_input_in_one_line_writing_nothing(lmms_eval, argv, message, tmp_path, capsys):
    from lmmlab.cli import main

    out = tmp_path / "scores.json"
    assert main(["lmms-eval", *argv, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("lmmlab lmms-eval: error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []
