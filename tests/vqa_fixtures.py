"""Small ScienceQA / POPE / TextVQA data sets in both published layouts, drawn with the shapes renderer.

`records(benchmark, n)` gives lmms-lab-style records whose `image` is PNG bytes; `write_parquet` stores them as the
Hugging Face parquet files do (image column {"bytes", "path"}); `write_jsonl` as JSONL + an image folder.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from lmmlab.tasks import shapes

CATEGORIES = ("adversarial", "popular", "random")
DISTRACTORS = ("nothing", "seven", "maybe")  # never an answer of the shapes quiz


def png(sample: shapes.Sample) -> bytes:
    buffer = io.BytesIO()
    sample.image().save(buffer, format="PNG")
    return buffer.getvalue()


def records(benchmark: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records of `benchmark` about shapes scenes (POPE asks two questions per image, as the real one does)."""
    scenes = shapes.split("test", n, seed=seed)
    out = []
    for i, sample in enumerate(scenes):
        image = png(sample)
        if benchmark == "scienceqa":
            choices = [sample.answer, *DISTRACTORS[: 1 + i % 3]]
            k = i % len(choices)
            choices = choices[k:] + choices[:k]  # the right answer at every position in turn
            out.append({"image": image, "question": sample.question, "choices": choices,
                        "answer": choices.index(sample.answer), "hint": "" if i % 2 else "a scene of shapes",
                        "task": "closed choice", "subject": "shapes"})
        elif benchmark == "pope":
            present = sorted({s.shape for s in sample.scene})
            absent = sorted(set(shapes.SHAPES) - set(present))
            for j, (shape, answer) in enumerate([(present[0], "yes"), (absent[0], "no")]):
                out.append({"id": str(2 * i + j), "question_id": str(2 * i + j + 1),
                            "question": f"Is there a {shape} in the image?", "answer": answer,
                            "image_source": f"scene_{i:04d}", "image": image, "category": CATEGORIES[i % 3]})
        elif benchmark == "textvqa":
            # 10 human answers, the right one the most common (5-7 times, once more with an article).
            answers = [sample.answer] * (5 + i % 3) + [f"the {sample.answer}", "unanswerable"] + ["maybe"] * (3 - i % 3)
            out.append({"image_id": f"img{i:04d}", "question_id": 34602 + i, "question": sample.question,
                        "question_tokens": sample.question.split(), "image": image, "answers": answers,
                        "ocr_tokens": ["shape", "scene"], "set_name": "val"})
        else:
            raise ValueError(benchmark)
    return out[:n]


def write_parquet(rows: list[dict], path: Path) -> Path:
    """The Hugging Face layout: the image column is a struct {"bytes": PNG, "path": file name}."""
    frame = pd.DataFrame([{**r, "image": {"bytes": r["image"], "path": f"{i}.png"}} for i, r in enumerate(rows)])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


def write_jsonl(rows: list[dict], path: Path, image_dir: str = "images") -> Path:
    """One JSON object per line; `image` is a path relative to the file's folder."""
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(rows):
        name = f"{image_dir}/{i}.png"
        (path.parent / name).write_bytes(r["image"])
        lines.append(json.dumps({**r, "image": name}))
    path.write_text("\n".join(lines) + "\n")
    return path
