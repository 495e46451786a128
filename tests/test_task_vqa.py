"""The published multimodal benchmarks (ScienceQA-IMG, POPE, TextVQA): metrics against hand-checked cases, both data
layouts, splits, prompts, an end-to-end evaluation on a tiny LLaVA, and the errors a user can cause."""
import copy
import json
import math
import statistics
import sys

import pandas as pd
import pytest
import torch

import vqa_fixtures as fx
from lmmlab.models import load_model
from lmmlab.tasks import get_task
from lmmlab.tasks import vqa
from lmmlab.tasks.vqa import normalize_answer, parse_letter, pope_metrics, pope_yes_no, vqa_score

BENCHMARKS = ("scienceqa", "pope", "textvqa")


# --- metrics -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("the cat.", "cat"), ("Cat", "cat"), ("A dog!", "dog"), ("coca-cola", "coca cola"),
    ("1.5", "1.5"), ("3,000", "3000"), ("dont", "don't"), ("None", "0"), ("hello ( world )", "hello world"),
    ("  Yes.\n", "yes"), ("an apple, the pear", "apple pear"),
])
def test_vqa_answers_are_normalised_as_evalai_does(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_averages_min_matches_over_3_across_leave_one_out_subsets():
    # Hand-checked: with m of 10 annotators matching, the 10 leave-one-out subsets average to
    # (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
    def by_hand(m):
        return (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10

    assert [round(by_hand(m), 6) for m in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]
    answers = ["two", "2", "Two", "three", "3", "the three.", "four", "4", "4", "Four"]
    assert vqa_score("2", answers) == pytest.approx(0.9)  # "two", "2", "Two" -> 3 matches
    assert vqa_score("The four", answers) == pytest.approx(1.0)  # 4 matches
    assert vqa_score("five", answers) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa_score("the cat.", one) == pytest.approx(0.3)
    assert vqa_score("cat", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(0.6)


def test_pope_answers_are_read_as_llavas_eval_pope_reads_them():
    assert pope_yes_no("Yes, there is a dog in the image.") == "yes"
    assert pope_yes_no("No, there is no cat.") == "no"
    assert pope_yes_no("There is not a cat. No doubt.") == "no"  # the first sentence decides
    assert pope_yes_no("Yes. No") == "yes"
    assert pope_yes_no("no") == "no"
    assert pope_yes_no("NO") == "yes"  # LLaVA's rule: only "No", "no" and "not" mean no
    assert pope_yes_no("") == "yes"


def test_pope_metrics_on_a_confusion_table():
    # TP=3, FP=1, TN=4, FN=2 (10 items): precision 3/4, recall 3/5, F1 2PR/(P+R), accuracy 7/10, 4 "yes" said.
    pred = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    gold = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = pope_metrics(pred, gold)
    p, r = 3 / 4, 3 / 5
    assert m == pytest.approx({"accuracy": 0.7, "precision": p, "recall": r, "f1": 2 * p * r / (p + r),
                               "yes_ratio": 0.4})
    none_said = pope_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert none_said == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("B. dog", "B"), ("(B) dog", "B"), ("The answer is B.", "B"),
    ("The answer is B", "B"), ("The answer is (B).", "B"), (" C ", "C"),
    ("E", None), ("dog", None), ("A B", None), ("The answer is A. The answer is B.", None), ("", None),
    ("The answer is Because", None),
])
def test_scienceqa_letters_are_parsed_as_llava_and_lmms_eval_do(text, letter):
    assert parse_letter(text, 4) == letter


# --- data ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """For each benchmark, the same 40 records as a parquet file and as JSONL + an image folder."""
    root = tmp_path_factory.mktemp("vqa")
    out = {}
    for name in BENCHMARKS:
        rows = fx.records(name, 40)
        shard = f"{get_task(name).default_source_split}-00000-of-00001.parquet"  # the lmms-lab file name
        out[name] = {"rows": rows, "parquet": fx.write_parquet(rows, root / name / shard),
                     "jsonl": fx.write_jsonl(rows, root / name / "jsonl" / "data.jsonl")}
    return out


def summary(task):
    return [(i.uid, i.split, i.prompt, i.reference, i.answers, i.n_choices, i.category) for i in task.load()]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_parquet_and_jsonl_layouts_give_the_same_items(data, name):
    from_parquet = get_task(name, data=str(data[name]["parquet"]))
    from_jsonl = get_task(name, data=str(data[name]["jsonl"]))
    assert summary(from_parquet) == summary(from_jsonl)
    assert len(from_parquet.load()) == 40
    first_parquet, first_jsonl = from_parquet.load()[0], from_jsonl.load()[0]
    assert isinstance(first_parquet.image, bytes) and first_jsonl.image.is_file()
    assert first_parquet.pil_image().tobytes() == first_jsonl.pil_image().tobytes()
    assert first_parquet.pil_image().size == (48, 48)
    folder = get_task(name, data=str(data[name]["parquet"].parent))  # a folder of shards reads the same
    assert summary(folder) == summary(from_parquet)


def test_items_carry_what_the_published_records_say(data):
    sqa = get_task("scienceqa", data=data["scienceqa"]["jsonl"]).load()
    for item, row in zip(sqa, data["scienceqa"]["rows"]):
        assert item.reference == item.answers[0] == "ABCD"[row["answer"]] and item.n_choices == len(row["choices"])
    pope = get_task("pope", data=data["pope"]["jsonl"]).load()
    assert [(i.uid, i.answers[0], i.category) for i in pope] == [
        (r["question_id"], r["answer"], r["category"]) for r in data["pope"]["rows"]]
    text = get_task("textvqa", data=data["textvqa"]["jsonl"]).load()
    for item, row in zip(text, data["textvqa"]["rows"]):
        assert item.answers == tuple(row["answers"]) and item.uid == str(row["question_id"])
        assert item.reference == row["answers"][0]  # the most common answer, by construction


def test_prompts_follow_llava_1_5(tmp_path):
    image = fx.png(fx.shapes.split("test", 1)[0])
    sqa = {"question": "Which animal is a mammal?", "choices": ["frog", "dog", "eel"], "answer": 1,
           "hint": "Look at the picture.", "image": image}
    pope = {"question_id": "7", "question": " Is there a dog in the image? ", "answer": "Yes", "image": image}
    text = {"question_id": 3, "question": "what brand is THIS?", "answers": ["nikon"] * 10,
            "ocr_tokens": ["NIKON", "D90"], "image": image}
    for name, row in (("scienceqa", sqa), ("pope", pope), ("textvqa", text)):
        fx.write_parquet([row], tmp_path / f"{name}.parquet")
    assert get_task("scienceqa", data=tmp_path / "scienceqa.parquet").load()[0].prompt == (
        "Context: Look at the picture.\nWhich animal is a mammal?\nA. frog\nB. dog\nC. eel\n"
        "Answer with the option's letter from the given choices directly.")
    item = get_task("pope", data=tmp_path / "pope.parquet").load()[0]
    assert item.prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert item.answers == ("yes",)
    assert get_task("textvqa", data=tmp_path / "textvqa.parquet").load()[0].prompt == (
        "What brand is this?\nAnswer the question using a single word or phrase.")
    assert get_task("textvqa", data=tmp_path / "textvqa.parquet", ocr=True).load()[0].prompt == (
        "What brand is this?\nReference OCR token: NIKON, D90\nAnswer the question using a single word or phrase.")


def test_the_prompt_goes_through_the_chat_template_when_the_processor_has_one(tiny_llava_dir):
    processor = load_model(tiny_llava_dir, device="cpu").processor
    assert not processor.chat_template
    assert vqa.prompt_text(processor, "Q?") == "USER: <image>\nQ? ASSISTANT:"
    templated = copy.deepcopy(processor)
    # llava-hf/llava-1.5-7b-hf's chat template (its user turn and generation prompt).
    templated.chat_template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    assert vqa.prompt_text(templated, "Q?") == "USER: <image>\nQ? ASSISTANT:"
    templated.chat_template = "{{ messages[0]['content'][1]['text'] }} <image> [ANSWER]"
    assert vqa.prompt_text(templated, "Q?") == "Q? <image> [ANSWER]"


def test_splits_are_disjoint_stable_and_sized_10_30_60(data):
    keys = [f"q{i}" for i in range(6000)]
    items = [vqa.Item(uid=k, group=k, prompt="", reference="", answers=(), image=b"") for k in keys]
    shares = {s: sum(i.split == s for i in items) / len(items) for s in vqa.SPLIT_BUCKETS}
    assert shares == pytest.approx({"calibration": 0.1, "validation": 0.3, "test": 0.6}, abs=0.02)
    task = get_task("pope", data=data["pope"]["parquet"])
    splits = {s: task.items(s) for s in vqa.SPLIT_BUCKETS}
    uids = [i.uid for items in splits.values() for i in items]
    assert sorted(uids) == sorted(i.uid for i in task.load())  # every item in exactly one split
    for split, chosen in splits.items():  # POPE keeps both questions about an image in one split
        images = {i.group for i in chosen}
        assert all(i.group not in images for other, rest in splits.items() if other != split for i in rest)
    assert [i.uid for i in task.items("test", 5)] == [i.uid for i in splits["test"][:5]]
    again = get_task("pope", data=data["pope"]["jsonl"])
    assert {s: [i.uid for i in again.items(s)] for s in splits} == {s: [i.uid for i in v] for s, v in splits.items()}


def test_a_sharded_folder_reads_the_shards_of_the_source_split(data, tmp_path):
    rows = data["textvqa"]["rows"]
    fx.write_parquet(rows[:25], tmp_path / "validation-00000-of-00002.parquet")
    fx.write_parquet(rows[25:], tmp_path / "validation-00001-of-00002.parquet")
    fx.write_parquet([{**r, "answers": [""] * 10} for r in rows[:5]], tmp_path / "test-00000-of-00001.parquet")
    assert summary(get_task("textvqa", data=tmp_path)) == summary(get_task("textvqa", data=data["textvqa"]["jsonl"]))
    with pytest.raises(ValueError, match="no answer .*validation"):
        get_task("textvqa", data=tmp_path, source_split="test").load()
    with pytest.raises(ValueError, match="holds no 'train' split \\(it has test, validation\\)"):
        get_task("textvqa", data=tmp_path, source_split="train").load()


def test_dataset_folders_as_published_read_the_right_split_and_configuration(data, tmp_path):
    """Folders laid out as the lmms-lab repositories are downloaded (not made by this project's writer): the split
    from the shard names under data/, a configuration per folder (ScienceQA-IMG chosen over ScienceQA-FULL), a
    folder per split (datasets' parquet export); a README beside the data is ignored."""
    pope, sqa, text = (data[n]["rows"] for n in ("pope", "scienceqa", "textvqa"))
    repo = tmp_path / "POPE"
    fx.write_parquet(pope[:30], repo / "data" / "test-00000-of-00002.parquet")
    fx.write_parquet(pope[30:], repo / "data" / "test-00001-of-00002.parquet")
    (repo / "README.md").write_text("---\nconfigs: [{config_name: default, data_files: data/test-*}]\n---\n")
    assert summary(get_task("pope", data=repo)) == summary(get_task("pope", data=data["pope"]["parquet"]))
    sqa_repo = tmp_path / "ScienceQA"
    fx.write_parquet(sqa, sqa_repo / "ScienceQA-IMG" / "test-00000-of-00001.parquet")
    fx.write_parquet(sqa[:3], sqa_repo / "ScienceQA-FULL" / "test-00000-of-00001.parquet")
    fx.write_parquet(sqa[:3], sqa_repo / "ScienceQA-IMG" / "validation-00000-of-00001.parquet")
    assert summary(get_task("scienceqa", data=sqa_repo)) == summary(get_task("scienceqa",
                                                                             data=data["scienceqa"]["parquet"]))
    export = tmp_path / "textvqa-export"
    fx.write_parquet(text, export / "default" / "validation" / "0000.parquet")
    fx.write_parquet(text[:2], export / "default" / "train" / "0000.parquet")
    assert summary(get_task("textvqa", data=export)) == summary(get_task("textvqa", data=data["textvqa"]["parquet"]))
    twice = tmp_path / "two-configs"
    fx.write_parquet(text, twice / "a" / "validation-00000-of-00001.parquet")
    fx.write_parquet(text, twice / "b" / "validation-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="'validation' split in 2 configurations \\(a, b\\); point --data"):
        get_task("textvqa", data=twice).load()
    hidden = tmp_path / "hidden"
    fx.write_parquet(pope, hidden / ".cache" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="holds no .parquet files"):
        get_task("pope", data=hidden).load()


def test_a_dataset_name_goes_to_the_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    task = get_task("pope", data="someone/POPE-copy")
    assert task.describe() == "pope (someone/POPE-copy:test)"
    with pytest.raises(ValueError, match="not installed to fetch someone/POPE-copy"):
        task.load()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("pope", data="not/a/name/or/path")


# --- end to end on a tiny LLaVA ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    return load_model(tiny_llava_dir, device="cpu")


@torch.no_grad()
def plain_greedy(loaded, item, steps: int) -> str:
    """Greedy decoding of one item by full forward passes, no cache: the direct computation."""
    inputs = vqa.collate(loaded, [item])
    ids, eos = inputs["input_ids"], loaded.tokenizer.eos_token_id
    out = []
    for _ in range(steps):
        token = loaded.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1].argmax().item()
        if token == eos:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return loaded.tokenizer.decode(out, skip_special_tokens=True).strip()


@torch.no_grad()
def plain_loss(loaded, item) -> float:
    """Teacher-forced NLL of the reference answer, one full forward pass on the item alone."""
    prompt, full = vqa.collate(loaded, [item]), vqa.collate(loaded, [item], with_answers=True)
    k = full["input_ids"].shape[1] - prompt["input_ids"].shape[1]
    logits = loaded.model(input_ids=full["input_ids"], pixel_values=full["pixel_values"]).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[-k - 1:-1], full["input_ids"][0, -k:]).item()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_evaluate_scores_greedy_answers_as_the_benchmark_does(tiny, data, name):
    task = get_task(name, data=data[name]["parquet"], batch_size=2, max_new_tokens=3)
    m = task.evaluate(tiny, split="test", n=3)
    items = task.items("test", 3)
    assert m.n == len(m.per_item) == len(m.predictions) == 3
    assert m.primary_metric == task.primary_metric and m.direction == "maximize"
    assert 0.0 <= m.primary <= 1.0 and m.primary == m.values[task.primary_metric]
    assert m.primary == pytest.approx(statistics.fmean(m.per_item))
    assert m.per_item == [task.score(p, i) for p, i in zip(m.predictions, items)]
    assert m.predictions == [plain_greedy(tiny, item, 3) for item in items]  # bucketed, cached = direct
    assert m.loss == pytest.approx(statistics.fmean(plain_loss(tiny, item) for item in items), rel=1e-4)
    assert m.kv_bytes > 0 and m.latency_s > 0 and m.peak_mem_bytes > 0
    expected = {"scienceqa": {"accuracy"}, "textvqa": {"vqa_accuracy"},
                "pope": {"accuracy", "precision", "recall", "f1", "yes_ratio"}}[name]
    assert expected <= set(m.values) and all(0.0 <= v <= 1.0 for v in m.values.values())
    again = task.evaluate(tiny, split="test", n=3)
    assert (again.predictions, again.per_item, again.loss) == (m.predictions, m.per_item, m.loss)

    batches = task.calibration_batches(tiny, n=3, seed=1, batch_size=2)
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    for b in batches:
        assert b["attention_mask"].shape == b["input_ids"].shape
        assert b["pixel_values"].dtype == tiny.model.dtype and len(b["pixel_values"]) == len(b["input_ids"])
        assert (b["attention_mask"][:, -1] == 1).all()  # left padding
    same = task.calibration_batches(tiny, n=3, seed=1, batch_size=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, same))


def _with_image(item, size: tuple[int, int]):
    """The item with its image resized to `size` (width, height), as PNG bytes."""
    import dataclasses
    import io

    buffer = io.BytesIO()
    item.pil_image().resize(size).save(buffer, format="PNG")
    return dataclasses.replace(item, image=buffer.getvalue())


def test_item_lengths_are_what_the_processor_builds(tiny, data):
    task = get_task("scienceqa", data=data["scienceqa"]["parquet"])
    items = task.items("test", 8)
    items += [_with_image(items[0], (64, 80)), _with_image(items[1], (30, 20))]  # other sizes: measured per size
    for with_answers in (False, True):
        built = [vqa.collate(tiny, [item], with_answers=with_answers)["input_ids"].shape[1] for item in items]
        assert vqa.item_lengths(tiny, items, with_answers=with_answers) == built
    assert len(set(vqa.item_lengths(tiny, items))) > 1  # hints and choices make the prompts differ in length


def test_a_2bit_cache_gives_each_item_what_it_gives_alone(tiny, data):
    """Batches hold one token length (no pads in the key groups): answers and bytes as each item alone, losses
    up to the float rounding of a batched matrix product (kernels round a 1-row product differently)."""
    from lmmlab.kv.cache import kv_cache_for
    from lmmlab.plan import CompressionPlan

    plan = CompressionPlan.uniform(tiny.num_layers, 0.0, kv_bits=2, kv_group_size=4, kv_residual=8)
    task = get_task("scienceqa", data=data["scienceqa"]["parquet"], batch_size=8, max_new_tokens=2)
    items = task.items("test")
    lengths = vqa.item_lengths(tiny, items)
    assert len(set(lengths)) > 1 and len(lengths) > len(set(lengths))  # several lengths, some shared
    together = task.evaluate(tiny, split="test", make_cache=lambda: kv_cache_for(plan, tiny))
    alone = []
    for item in items:
        one = get_task("scienceqa", data=data["scienceqa"]["parquet"], batch_size=1, max_new_tokens=2)
        one._items = [item]
        alone.append(one.evaluate(tiny, split=item.split, make_cache=lambda: kv_cache_for(plan, tiny)))
    assert together.predictions == [m.predictions[0] for m in alone]
    assert together.kv_bytes * len(items) == sum(m.kv_bytes for m in alone)
    assert together.per_item_loss == pytest.approx([m.per_item_loss[0] for m in alone], rel=1e-5, abs=1e-7)


def test_repeated_image_questions_are_kept_and_counted(tmp_path, data, caplog):
    rows = data["pope"]["rows"][:6]
    rows = rows + [{**rows[0], "question_id": "900", "category": "popular"}]  # POPE repeats its "yes" questions
    task = get_task("pope", data=fx.write_parquet(rows, tmp_path / "pope.parquet"))
    with caplog.at_level("INFO", logger="lmmlab.tasks.vqa"):
        assert len(task.load()) == 7
    assert vqa.repeated_items(task.load()) == 1
    assert "1 items repeat an (image, prompt) pair" in caplog.text


def test_pope_values_are_its_metrics_of_the_predictions(tiny, data):
    task = get_task("pope", data=data["pope"]["jsonl"], batch_size=4, max_new_tokens=2)
    m = task.evaluate(tiny, split="validation", n=6, with_loss=False)
    items = task.items("validation", 6)
    said = [pope_yes_no(p) for p in m.predictions]
    expected = pope_metrics(said, [i.answers[0] for i in items])
    assert {k: m.values[k] for k in expected} == expected and math.isnan(m.loss)
    for category in {i.category for i in items}:
        kept = [(s, i.answers[0]) for s, i in zip(said, items) if i.category == category]
        assert m.values[f"f1_{category}"] == pope_metrics(*zip(*kept))["f1"]


# --- errors --------------------------------------------------------------------------------------------------------

def test_missing_or_empty_data_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        get_task("pope", data=tmp_path / "nope.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        get_task("pope", data=tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="blank.jsonl holds no records"):
        get_task("pope", data=tmp_path / "blank.jsonl").load()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no .parquet files"):
        get_task("pope", data=tmp_path / "folder").load()
    with pytest.raises(ValueError, match="expected a .parquet file"):
        get_task("pope", data=tmp_path / "folder" / "notes.txt").load()


def bad_jsonl(tmp_path, rows, name="bad.jsonl"):
    return fx.write_jsonl(rows, tmp_path / name)


def test_malformed_records_name_the_line_and_the_field(tmp_path, data):
    rows = fx.records("pope", 4)
    path = bad_jsonl(tmp_path, rows)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2: not valid JSON"):
        get_task("pope", data=path).load()
    no_question = [rows[0], rows[1], {k: v for k, v in rows[2].items() if k != "question"}]
    with pytest.raises(ValueError, match="line 3: missing field 'question'"):
        get_task("pope", data=bad_jsonl(tmp_path, no_question)).load()
    with pytest.raises(ValueError, match="row 1: field 'answer' must be 'yes' or 'no', got 'maybe'"):
        maybe = fx.write_parquet([rows[0], {**rows[1], "answer": "maybe"}], tmp_path / "p.parquet")
        get_task("pope", data=maybe).load()
    sqa = fx.records("scienceqa", 2)
    with pytest.raises(ValueError, match="line 2: field 'answer' must be a choice index 0-2 or its letter A-C, got 5"):
        get_task("scienceqa", data=bad_jsonl(tmp_path, [sqa[0], {**sqa[1], "answer": 5}])).load()
    with pytest.raises(ValueError, match="line 1: field 'choices' must be a list of strings"):
        get_task("scienceqa", data=bad_jsonl(tmp_path, [{**sqa[0], "choices": "A or B"}])).load()
    text = fx.records("textvqa", 1)
    with pytest.raises(ValueError, match="line 1: field 'answers' must be a list of strings"):
        get_task("textvqa", data=bad_jsonl(tmp_path, [{**text[0], "answers": [1, 2]}])).load()
    no_image = fx.write_parquet(rows[:1], tmp_path / "noimg.parquet")
    frame = pd.read_parquet(no_image)
    frame["image"] = [{"bytes": None, "path": None}]
    frame.to_parquet(no_image)
    with pytest.raises(ValueError, match="row 0: missing field 'image'"):
        get_task("pope", data=no_image).load()


def test_a_missing_image_file_is_named(tmp_path):
    path = bad_jsonl(tmp_path, fx.records("textvqa", 3))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "images").rename(elsewhere / "images")
    with pytest.raises(FileNotFoundError, match=r"line 1: image file .*images/0.png does not exist"):
        get_task("textvqa", data=path).load()
    assert len(get_task("textvqa", data=path, image_folder=elsewhere).load()) == 3  # paths relative to image_folder
    (elsewhere / "images" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 2: image file .*elsewhere/images/1.png does not exist"):
        get_task("textvqa", data=path, image_folder=elsewhere).load()
    with pytest.raises(FileNotFoundError, match="image_folder .*nowhere is not a folder"):
        get_task("textvqa", data=path, image_folder=tmp_path / "nowhere")


def test_data_of_another_benchmark_names_the_required_fields(data, tmp_path):
    with pytest.raises(ValueError, match="no field\\(s\\) choices; scienceqa needs question, choices, answer, image "
                                         "\\(optional: hint\\); its fields match pope"):
        get_task("scienceqa", data=data["pope"]["parquet"]).load()
    with pytest.raises(ValueError, match="no field\\(s\\) question_id, answers; textvqa needs .*match scienceqa"):
        get_task("textvqa", data=data["scienceqa"]["jsonl"]).load()
    (tmp_path / "caps.jsonl").write_text(json.dumps({"caption": "a cat", "image": "cat.png"}) + "\n")
    with pytest.raises(ValueError, match="no field\\(s\\) question_id, question, answer; pope needs question_id, "
                                         "question, answer, image \\(optional: category, image_source\\); it has "
                                         "caption, image$"):
        get_task("pope", data=tmp_path / "caps.jsonl").load()


def test_a_text_only_model_fails_clearly(tiny_llama_dir, data):
    llama = load_model(tiny_llama_dir, device="cpu")
    task = get_task("pope", data=data["pope"]["parquet"])
    with pytest.raises(ValueError, match="needs images.*text-only model"):
        task.evaluate(llama, n=1)
    with pytest.raises(ValueError, match="needs images.*text-only model"):
        task.calibration_batches(llama, n=1)


def test_bad_options_and_splits_fail_clearly(data):
    with pytest.raises(ValueError, match="unknown split 'train'"):
        get_task("pope", data=data["pope"]["parquet"]).items("train")
    with pytest.raises(ValueError, match="max_new_tokens and batch_size must be >= 1"):
        get_task("textvqa", data=data["textvqa"]["parquet"], max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown option\\(s\\) ocr for task 'pope'"):
        get_task("pope", ocr=True)


def test_without_data_the_hub_needs_the_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as when it is not installed (it is not a dependency)
    with pytest.raises(ValueError, match="datasets` library is not installed to fetch lmms-lab/POPE; pass data="):
        get_task("pope").load()


def test_the_datasets_library_reads_what_the_parquet_files_hold(data, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # leave the user's cache alone
    repo = tmp_path / "POPE"  # a local copy of the lmms-lab layout: data/test-*.parquet
    fx.write_parquet(data["pope"]["rows"], repo / "data" / "test-00000-of-00001.parquet")
    monkeypatch.setattr(vqa.POPE, "dataset", str(repo))
    assert summary(get_task("pope")) == summary(get_task("pope", data=data["pope"]["parquet"]))
    assert get_task("pope").describe() == f"pope ({repo}:test)"
