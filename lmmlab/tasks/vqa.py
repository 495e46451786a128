"""Multimodal benchmarks in their published formats: ScienceQA-IMG, POPE and TextVQA, with LLaVA-1.5's prompts and
the metrics as their authors' scripts compute them.

Data: the lmms-lab Hugging Face parquet files (`data=` a parquet file or a folder of them; the image column embedded
as {"bytes", "path"}), the same fields as JSONL with `image` a path relative to the file (or to `image_folder`), or,
with `data` left out, the lmms-lab dataset through the `datasets` library when it is installed and can reach or has
cached it. Fields:
  scienceqa  question, choices (list), answer (index into choices, or its letter), image; hint optional
             (lmms-lab/ScienceQA, config ScienceQA-IMG, split test: 2017 items)
  pope       question_id, question, answer ("yes"/"no"), image; category, image_source optional
             (lmms-lab/POPE, split test: 9000 items, adversarial / popular / random)
  textvqa    question_id, question, answers (the 10 human answers), image; image_id, ocr_tokens optional
             (lmms-lab/textvqa, split validation: 5000 items; the test split has no public answers)

Prompts (LLaVA-1.5 as lmms-eval writes them; Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"):
  scienceqa  "Context: {hint}\\n" (when there is a hint) + question + "\\nA. ...\\nB. ..."
             + "\\nAnswer with the option's letter from the given choices directly."
  pope       question + "\\nAnswer the question using a single word or phrase."
  textvqa    Question (capitalised, as lmms-eval does) [+ "\\nReference OCR token: a, b, ..." with ocr=True, LLaVA's
             own evaluation file] + "\\nAnswer the question using a single word or phrase."
Each prompt goes through the processor's chat template when it has one (llava-hf models: "USER: <image>\\n{prompt}
ASSISTANT:"), else through that same LLaVA-1.5 format written out.

Metrics:
  scienceqa  accuracy of the parsed option letter (LLaVA's eval_science_qa and lmms-eval's sqa_process_results rules)
  pope       accuracy, precision, recall, F1 and yes-ratio of predicted "yes" (LLaVA's eval_pope; Li et al. 2023,
             "Evaluating Object Hallucination in Large Vision-Language Models"), plus F1 per category
  textvqa    VQA accuracy (Antol et al. 2015): EvalAI's answer normalisation, then min(#matching annotators / 3, 1)
             averaged over the 10 leave-one-annotator-out subsets, as the official VQA/TextVQA evaluation does

Splits: the published files are one evaluation split. An item falls into calibration / validation / test (10 / 30 /
60 %) by a stable hash of its image's id where the benchmark has one (POPE's image_source, TextVQA's image_id) so no
image is shared across splits, else of its question id (ScienceQA has none: its question, choices and hint). Within
a split, items are ordered by a hash of their question id, so the first n are a fixed, category-mixed sample.
Published items are taken as given, repeats included: POPE asks each image's "yes" questions once per negative-sampling
category (random / popular / adversarial), so the same (image, question) recurs by design and its published numbers
count every copy; dropping them would change the benchmark. `load` logs how many items repeat an (image, prompt) pair
already seen, so a paired test on such a split can be read knowing that its items are not all distinct.

Evaluation follows the protocol of the shapes task: the image and the prompt, all but its last token, are prefilled
into a fresh cache from `make_cache`; every answer token is then decoded greedily from that cache. Batches hold items
of one token length only (`base.buckets`, lengths exact as the processor builds them), so no pad token enters a
quantization group, a scale or the byte count and no item's answer or loss depends on its batch. Calibration batches
stay left-padded: calibration masks pads out.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import statistics
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from lmmlab.tasks.base import (CacheFactory, Metrics, Task, answer_items, check_data_path, check_split,
                               peak_memory, register, reset_peak_memory, token_lengths)
from lmmlab.tasks.layout import is_hub_name, split_files

log = logging.getLogger(__name__)

SPLIT_BUCKETS = {"calibration": range(0, 10), "validation": range(10, 40), "test": range(40, 100)}  # of 100
DEFAULT_CALIBRATION_ITEMS = 128
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
LLAVA_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5 (vicuna_v1 roles), as llava-hf's template writes it
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- metrics as published ------------------------------------------------------------------------------------------

def parse_letter(text: str, n_choices: int) -> str | None:
    """The option letter a ScienceQA answer names, or None. Rules in order: the bare letter (any case, lmms-eval);
    "B." / "B. text" (lmms-eval, LLaVA); "(B) text" (added); "The answer is B" exactly once (LLaVA's regex, with the
    letter ending a word: LLaVA's `([A-Z]).` reads "The answer is Because" as B and misses a final "B"). A letter
    past the last choice counts as no answer."""
    text = text.strip()
    letters = LETTERS[:n_choices]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        found = text[0]
    elif match := re.match(r"\(([A-Z])\)", text):
        found = match.group(1)
    else:
        found_all = re.findall(r"The answer is \(?([A-Z])(?:[^A-Za-z]|$)", text)
        found = found_all[0] if len(found_all) == 1 else None
    return found if found is not None and found in letters else None


def pope_yes_no(text: str) -> str:
    """An answer read as LLaVA's eval_pope reads it: its first sentence, commas dropped, is "no" when one of its
    space-separated words is exactly "No", "no" or "not", else "yes" (so an empty or "NO" answer counts as yes)."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 (positive class "yes") and yes-ratio (share of predicted "yes", as in
    LLaVA's eval_pope) from normalised yes/no predictions; a ratio with an empty denominator is 0."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pairs),
    }


# EvalAI's answer normalisation (the VQA evaluation's processPunctuation / processDigitArticle), as LLaVA's
# m4c_evaluator and lmms-eval copy it from MMF; the tables are the originals, quirks included.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
# sic: the original's look-behind is malformed, so a period goes unless a digit follows ("1.5" keeps it, "5." not).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_answer(text: str) -> str:
    """EvalAI's normalisation of a VQA answer: lower case, punctuation dropped or spaced, number words to digits,
    articles removed, contractions restored ("Two" -> "2", "the cat." -> "cat")."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATIONS:
        if p + " " in text or " " + p in text or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_STRIP.sub("", out)
    words = [NUMBER_MAP.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: for each annotator left out, min(#other annotators who gave the prediction / 3,
    1), averaged over the annotators (10 for TextVQA/VQAv2), answers and prediction normalised alike."""
    pred = normalize_answer(prediction)
    gold = [normalize_answer(a) for a in answers]
    return statistics.fmean(
        min(1.0, sum(g == pred for j, g in enumerate(gold) if j != i) / 3) for i in range(len(gold)))


# --- items and splits ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One benchmark question, ready to prompt. `image` holds encoded bytes or a file path."""

    uid: str  # the question id (ScienceQA: a digest of question, choices and hint)
    group: str  # what decides the split: the image's id where the benchmark has one, else uid
    prompt: str  # the benchmark prompt, before the chat template
    reference: str  # the answer the loss teacher-forces (the letter; "yes"/"no"; the most common human answer)
    answers: tuple[str, ...]  # what the metric compares against (the letter; "yes"/"no"; the human answers)
    image: bytes | Path
    n_choices: int = 0
    category: str = ""

    @property
    def split(self) -> str:
        bucket = _digest(self.group) % 100
        return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)

    def pil_image(self):
        from PIL import Image

        try:
            with Image.open(self._source()) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ValueError(f"the image of item {self.uid} cannot be read: {err}") from None

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the image, read from its header without decoding it."""
        from PIL import Image

        try:
            with Image.open(self._source()) as image:
                return image.size
        except OSError as err:
            raise ValueError(f"the image of item {self.uid} cannot be read: {err}") from None

    def _source(self):
        return io.BytesIO(self.image) if isinstance(self.image, bytes) else self.image


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def repeated_items(items: Sequence[Item]) -> int:
    """How many items repeat an (image, prompt) pair of an earlier item (images compared by content, or by path)."""
    seen, repeats = set(), 0
    for item in items:
        image = (hashlib.blake2b(item.image, digest_size=16).digest() if isinstance(item.image, bytes)
                 else str(Path(item.image).resolve()))
        key = (image, item.prompt)
        repeats += key in seen
        seen.add(key)
    return repeats


# --- reading records -------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """Records from one place, each with where it stands ("file.jsonl line 3", for errors); `fields` are the first
    record's (a parquet file's columns); relative image paths resolve against `base`."""

    name: str
    fields: set[str]
    records: list[tuple[str, dict]]
    base: Path


def read_source(data: Path, *, source_split: str, image_folder: Path | None, config: str | None = None) -> Source:
    """Records of a .jsonl file, a .parquet file, or a folder of .parquet files — a dataset folder as published
    (`lmmlab.tasks.layout`: the `source_split` shards, of `config` where several configurations hold it)."""
    if data.is_file() and data.suffix == ".jsonl":
        return _read_jsonl(data, image_folder or data.parent)
    if data.is_file() and data.suffix == ".parquet":
        return _read_parquet([data], str(data), image_folder or data.parent)
    if data.is_dir():
        files = split_files(data, source_split, config=config)
        return _read_parquet(files, str(data), image_folder or data)
    raise ValueError(f"--data {data}: expected a .parquet file, a dataset folder of .parquet files, or a .jsonl file")


def _read_jsonl(path: Path, base: Path) -> Source:
    records, fields = [], set()
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            fields = fields or set(record)
            records.append((where, record))
    if not records:
        raise ValueError(f"--data {path} holds no records")
    return Source(str(path), fields, records, base)


def _read_parquet(files: list[Path], name: str, base: Path) -> Source:
    import pandas as pd

    records, fields = [], set()
    for file in files:
        try:
            frame = pd.read_parquet(file)
        except ImportError as err:
            raise ValueError(f"reading {file} needs pyarrow ({err}); pip install pyarrow") from None
        fields = fields or set(frame.columns)
        records += [(f"{file} row {i}", row) for i, row in enumerate(frame.to_dict("records"))]
    if not records:
        raise ValueError(f"--data {name} holds no records")
    return Source(name, fields, records, base)


def read_hub(dataset: str, config: str | None, split: str) -> Source:
    """Records of an lmms-lab dataset through the `datasets` library (not a dependency: imported here)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"no data=PATH given and the `datasets` library is not installed to fetch {dataset}; pass "
                         "data= a parquet file, a folder of parquet files or a .jsonl file, or pip install datasets")
    try:
        table = datasets.load_dataset(dataset, config, split=split)
        table = table.cast_column("image", datasets.Image(decode=False))
    except Exception as err:  # offline, not cached, gated...: one line, whatever the library raised
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        where = f"{dataset}{f' ({config})' if config else ''} split {split!r}"
        raise ValueError(f"cannot load {where} with `datasets` ({reason}); pass data=PATH") from None
    name = f"{dataset}:{split}"
    return Source(name, set(table.column_names), [(f"{name} row {i}", r) for i, r in enumerate(table)], Path.cwd())


# --- record fields ---------------------------------------------------------------------------------------------------

def _missing(value) -> bool:
    return value is None or isinstance(value, float) and value != value  # None, or pandas' NaN for an empty cell


def field_text(record: dict, field: str, where: str, *, optional: bool = False) -> str:
    value = record.get(field)
    if _missing(value):
        if optional:
            return ""
        raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def field_id(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if _missing(value) or isinstance(value, str) and not value.strip():
        raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(value, (str, int)) and not hasattr(value, "item"):
        raise ValueError(f"{where}: field {field!r} must be a string or an integer, got {value!r:.60}")
    return str(value.item() if hasattr(value, "item") else value)


def field_strings(record: dict, field: str, where: str, *, optional: bool = False) -> list[str]:
    """A list of strings (JSON list, or the numpy array pandas reads a parquet list column as)."""
    value = record.get(field)
    if value is None and optional:
        return []
    if value is None:
        raise ValueError(f"{where}: missing field {field!r}")
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"{where}: field {field!r} must be a list of strings, got {value!r:.60}")
    values = list(value)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: field {field!r} must be a list of strings, got {values!r:.60}")
    return values


def field_image(record: dict, where: str, base: Path) -> bytes | Path:
    """Encoded image bytes ({"bytes", "path"} as Hugging Face stores it, or a decoded PIL image), else an existing
    file named by a path relative to `base`."""
    value = record.get("image")
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if hasattr(value, "save"):  # a PIL image, as `datasets` decodes one
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} does not exist")
        return path
    if _missing(value) or value == "":
        raise ValueError(f"{where}: missing field 'image' (every item needs an image)")
    raise ValueError(f"{where}: field 'image' must be {{'bytes', 'path'}} or a file path, got {value!r:.60}")


# --- model plumbing: prompts and batches (base decodes from the cache and scores the answer) -----------------------

def prompt_text(processor, prompt: str) -> str:
    """The prompt in the model's conversation format: its processor's chat template (llava-hf models have one), else
    LLaVA-1.5's "USER: <image>\\n{prompt} ASSISTANT:"."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return LLAVA_FORMAT.format(prompt=prompt)


def texts(loaded, items: Sequence[Item], *, with_answers: bool = False) -> list[str]:
    prompts = [prompt_text(loaded.processor, item.prompt) for item in items]
    if with_answers:
        return [f"{p} {item.reference}{loaded.tokenizer.eos_token}" for p, item in zip(prompts, items)]
    return prompts


def collate(loaded, items: Sequence[Item], *, with_answers: bool = False) -> dict:
    """Processor inputs for a batch, left-padded, on the model's device, pixel values in the model's dtype."""
    inputs = loaded.processor(images=[item.pil_image() for item in items],
                              text=texts(loaded, items, with_answers=with_answers),
                              return_tensors="pt", padding=True, padding_side="left")
    inputs = dict(inputs.to(loaded.device))
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    return inputs


def item_lengths(loaded, items: Sequence[Item], *, with_answers: bool = False) -> list[int]:
    """Each item's exact token count as `collate` builds it (image tokens expanded), for `buckets`."""
    return token_lengths(loaded.processor, texts(loaded, items, with_answers=with_answers),
                         [item.image_size() for item in items])


def answer_lengths(loaded, items: Sequence[Item]) -> list[int]:
    """Tokens each item's reference answer (and the end token) adds to its prompt: the full text's tokens past the
    longest prefix they share with the prompt's (the image expands alike in both, so the count holds in the batch)."""
    tok, lengths = loaded.tokenizer, []
    for prompt, full in zip(texts(loaded, items), texts(loaded, items, with_answers=True)):
        a, b = tok(prompt)["input_ids"], tok(full)["input_ids"]
        shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lengths.append(len(b) - shared)
    return lengths


# --- the tasks -------------------------------------------------------------------------------------------------------

class VQATask(Task):
    """A published multimodal benchmark: data, splits, LLaVA-1.5 prompts, greedy answers from a cache, its metric.
    Subclasses name the dataset and fields and turn a record into an `Item`, an answer into a score."""

    direction: ClassVar[str] = "maximize"
    needs_images: ClassVar[bool] = True
    per_item_metric: ClassVar[str] = "correct"
    dataset: ClassVar[str]  # the lmms-lab dataset on the Hugging Face hub
    dataset_config: ClassVar[str | None] = None
    default_source_split: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, data: str | Path | None = None, source_split: str | None = None,
                 image_folder: str | Path | None = None, max_new_tokens: int = 16, batch_size: int = 8) -> None:
        """data: a parquet file, a dataset folder as published, a .jsonl file, or a dataset name ("lmms-lab/POPE")
        for `datasets` (None: the task's lmms-lab dataset);
        source_split: the published split to read (files `{source_split}-*.parquet` of a sharded folder);
        image_folder: where relative image paths point (default: the data file's folder)."""
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1; got {max_new_tokens}, {batch_size}")
        self.hub = str(data) if data is not None and is_hub_name(data) else None  # e.g. "lmms-lab/POPE"
        self.data = check_data_path(data) if data is not None and self.hub is None else None
        self.source_split = source_split or self.default_source_split
        self.image_folder = Path(image_folder) if image_folder is not None else None
        if self.image_folder is not None and not self.image_folder.is_dir():
            raise FileNotFoundError(f"image_folder {self.image_folder} is not a folder")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._items: list[Item] | None = None

    # What each benchmark defines.

    @abstractmethod
    def make_item(self, record: dict, where: str, base: Path) -> Item:
        """One record as an Item; a bad field raises one error naming `where` and the field."""

    @abstractmethod
    def score(self, prediction: str, item: Item) -> float:
        """The per-item value (0/1 correctness, or the VQA score)."""

    @abstractmethod
    def summarize(self, predictions: Sequence[str], items: Sequence[Item], scores: Sequence[float]) -> dict[str, float]:
        """The benchmark's metrics by name, the primary one included."""

    # Data.

    def describe(self) -> str:
        return f"{self.name} ({self.data or f'{self.hub or self.dataset}:{self.source_split}'})"

    def load(self) -> list[Item]:
        """Every item of the data, read and checked once (all splits), in file order."""
        if self._items is None:
            if self.data is not None:
                source = read_source(self.data, source_split=self.source_split, image_folder=self.image_folder,
                                     config=self.dataset_config)
            else:
                source = read_hub(self.hub or self.dataset, self.dataset_config, self.source_split)
            self.check_schema(source)
            self._items = [self.make_item(record, where, source.base) for where, record in source.records]
            sizes = Counter(item.split for item in self._items)
            log.info("%s: %d items from %s (calibration %d, validation %d, test %d)", self.name, len(self._items),
                     source.name, sizes["calibration"], sizes["validation"], sizes["test"])
            repeats = repeated_items(self._items)
            if repeats:
                log.info("%s: %d items repeat an (image, prompt) pair already seen; kept, as published", self.name,
                         repeats)
        return self._items

    def check_schema(self, source: Source) -> None:
        missing = [f for f in self.required if f not in source.fields]
        if not missing:
            return
        others = [cls.name for cls in _benchmarks() if cls is not type(self) and set(cls.required) <= source.fields]
        raise ValueError(
            f"{source.name} does not hold {self.name} data: no field(s) {', '.join(missing)}; {self.name} needs "
            f"{', '.join(self.required)}" + (f" (optional: {', '.join(self.optional)})" if self.optional else "")
            + (f"; its fields match {' / '.join(others)}" if others
               else f"; it has {', '.join(sorted(source.fields))}"))

    def items(self, split: str, n: int | None = None) -> list[Item]:
        """The first `n` items of a split (all when None), ordered by a hash of their question id."""
        check_split(split)
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        everything = self.load()
        chosen = sorted((item for item in everything if item.split == split), key=lambda item: _digest(item.uid))
        if not chosen:
            raise ValueError(f"split {split!r} of {self.describe()} holds no items ({len(everything)} items in all; "
                             "splits take 10/30/60 % of them by hash)")
        if n is not None and n > len(chosen):
            log.warning("%s: asked for %d %s items, the split holds %d", self.name, n, split, len(chosen))
        return chosen[:n]

    # The Task seam.

    def calibration_batches(self, loaded, *, n: int | None = None, seed: int = 0,
                            batch_size: int | None = None) -> list[dict]:
        """Processor inputs (prompt and reference answer, with attention_mask) of `n` calibration items drawn with
        `seed` (default: 128, or the whole split when smaller)."""
        self.check_model(loaded)
        pool = self.items("calibration")
        if n is not None and n > len(pool):
            log.warning("%s: asked for %d calibration items, the split holds %d", self.name, n, len(pool))
        n = min(n or DEFAULT_CALIBRATION_ITEMS, len(pool))
        chosen = random.Random(seed).sample(pool, n)
        size = batch_size or self.batch_size
        return [collate(loaded, chosen[i:i + size], with_answers=True) for i in range(0, n, size)]

    def evaluate(self, loaded, *, split: str = "test", make_cache: CacheFactory | None = None, n: int | None = None,
                 with_loss: bool = True, progress: bool = False) -> Metrics:
        """Greedy answers through a fresh cache per batch, scored as the benchmark scores them; latency counts the
        model's prefill and decoding, not image decoding."""
        self.check_model(loaded)
        items = self.items(split, n)
        reset_peak_memory(loaded.device)
        done = answer_items(loaded, items,
                            lengths=lambda part, answers: item_lengths(loaded, part, with_answers=answers),
                            inputs=lambda batch, answers: collate(loaded, batch, with_answers=answers),
                            answer_lengths=lambda batch: answer_lengths(loaded, batch), make_cache=make_cache,
                            batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, with_loss=with_loss,
                            progress=progress, desc=f"{self.name} {split}")
        predictions, losses, seconds, kv = done.predictions, done.losses, done.seconds, done.kv_bytes
        scores = [self.score(p, item) for p, item in zip(predictions, items)]
        values = self.summarize(predictions, items, scores)
        return Metrics(
            primary_metric=self.primary_metric, primary=values[self.primary_metric], direction=self.direction,
            loss=statistics.fmean(losses) if losses else float("nan"), latency_s=seconds / len(items),
            peak_mem_bytes=peak_memory(loaded.device), kv_bytes=kv / len(items), n=len(items), values=values,
            per_item=scores, per_item_metric=self.per_item_metric, predictions=predictions,
            per_item_loss=losses)


def _benchmarks() -> list[type[VQATask]]:
    return VQATask.__subclasses__()


@register
class ScienceQA(VQATask):
    """ScienceQA-IMG (Lu et al. 2022, "Learn to Explain"): multiple choice over science questions with an image,
    scored by the option letter the model names."""

    name = "scienceqa"
    primary_metric = "accuracy"
    dataset = "lmms-lab/ScienceQA"
    dataset_config = "ScienceQA-IMG"
    default_source_split = "test"
    required = ("question", "choices", "answer", "image")
    optional = ("hint",)

    def make_item(self, record: dict, where: str, base: Path) -> Item:
        question = field_text(record, "question", where)
        choices = field_strings(record, "choices", where)
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: field 'choices' must hold 2 to {len(LETTERS)} options, got {len(choices)}")
        hint = field_text(record, "hint", where, optional=True).strip()
        letter = self._answer_letter(record.get("answer"), len(choices), where)
        options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
        context = f"Context: {hint}\n" if hint else ""
        content = "\x1f".join([question, *choices, hint])
        uid = next((str(record[k]) for k in ("question_id", "id") if not _missing(record.get(k))),
                   f"sqa-{_digest(content):016x}")
        return Item(uid=uid, group=uid, prompt=f"{context}{question}\n{options}{LETTER_ANSWER}", reference=letter,
                    answers=(letter,), image=field_image(record, where, base), n_choices=len(choices))

    @staticmethod
    def _answer_letter(value, n_choices: int, where: str) -> str:
        """The answer's option letter from its index (lmms-lab stores int8) or the letter itself."""
        if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n_choices]:
            return value.strip().upper()
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_choices:
            return LETTERS[value]
        raise ValueError(f"{where}: field 'answer' must be a choice index 0-{n_choices - 1} or its letter "
                         f"A-{LETTERS[n_choices - 1]}, got {value!r:.60}")

    def score(self, prediction: str, item: Item) -> float:
        return float(parse_letter(prediction, item.n_choices) == item.answers[0])

    def summarize(self, predictions, items, scores) -> dict[str, float]:
        return {"accuracy": statistics.fmean(scores)}


@register
class POPE(VQATask):
    """POPE (Li et al. 2023): "Is there a <object> in the image?" over COCO, half yes, half no, with random, popular
    and adversarial negatives. Primary metric: accuracy, the mean of the per-item correctness, so an interval or a
    paired test on per_item is one on the primary; F1 (the papers' headline) is in `values`."""

    name = "pope"
    primary_metric = "accuracy"
    dataset = "lmms-lab/POPE"
    default_source_split = "test"
    required = ("question_id", "question", "answer", "image")
    optional = ("category", "image_source")

    def make_item(self, record: dict, where: str, base: Path) -> Item:
        uid = field_id(record, "question_id", where)
        question = field_text(record, "question", where).strip()
        answer = field_text(record, "answer", where).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"{where}: field 'answer' must be 'yes' or 'no', got {record['answer']!r:.60}")
        source = field_text(record, "image_source", where, optional=True)
        return Item(uid=uid, group=f"image:{source}" if source else uid, prompt=f"{question}{SHORT_ANSWER}",
                    reference=answer, answers=(answer,), image=field_image(record, where, base),
                    category=field_text(record, "category", where, optional=True))

    def score(self, prediction: str, item: Item) -> float:
        return float(pope_yes_no(prediction) == item.answers[0])

    def summarize(self, predictions, items, scores) -> dict[str, float]:
        said = [pope_yes_no(p) for p in predictions]
        values = pope_metrics(said, [item.answers[0] for item in items])
        for category in sorted({item.category for item in items} - {""}):
            kept = [(s, item.answers[0]) for s, item in zip(said, items) if item.category == category]
            values[f"f1_{category}"] = pope_metrics(*zip(*kept))["f1"]
        return values


@register
class TextVQA(VQATask):
    """TextVQA (Singh et al. 2019): questions that need the text in the image, 10 human answers each, scored by VQA
    accuracy. ocr=True adds the dataset's OCR tokens to the prompt as LLaVA-1.5's own evaluation file does (off by
    default, as in lmms-eval)."""

    name = "textvqa"
    primary_metric = "vqa_accuracy"
    per_item_metric = "vqa_score"
    dataset = "lmms-lab/textvqa"
    default_source_split = "validation"
    required = ("question_id", "question", "answers", "image")
    optional = ("image_id", "ocr_tokens")

    def __init__(self, *, data: str | Path | None = None, source_split: str | None = None,
                 image_folder: str | Path | None = None, max_new_tokens: int = 16, batch_size: int = 8,
                 ocr: bool = False) -> None:
        super().__init__(data=data, source_split=source_split, image_folder=image_folder,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.ocr = ocr

    def make_item(self, record: dict, where: str, base: Path) -> Item:
        uid = field_id(record, "question_id", where)
        question = field_text(record, "question", where)
        answers = [a.strip() for a in field_strings(record, "answers", where)]
        if not any(answers):
            raise ValueError(f"{where}: field 'answers' holds no answer (TextVQA's test split has no public answers; "
                             "use source_split=validation)")
        ocr = ""
        if self.ocr:
            ocr = f"\nReference OCR token: {', '.join(field_strings(record, 'ocr_tokens', where, optional=True))}"
        image_id = field_text(record, "image_id", where, optional=True)
        return Item(uid=uid, group=f"image:{image_id}" if image_id else uid,
                    prompt=f"{question.capitalize()}{ocr}{SHORT_ANSWER}",
                    reference=Counter(a for a in answers if a).most_common(1)[0][0], answers=tuple(answers),
                    image=field_image(record, where, base))

    def score(self, prediction: str, item: Item) -> float:
        return vqa_score(prediction, item.answers)

    def summarize(self, predictions, items, scores) -> dict[str, float]:
        return {"vqa_accuracy": statistics.fmean(scores)}
