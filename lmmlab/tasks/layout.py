"""Datasets as published: find one split's parquet files in a folder laid out the way a Hugging Face dataset
repository is downloaded (`huggingface-cli download --repo-type dataset`, `git clone`, or datasets' parquet export).

Layouts understood (a README.md, .gitattributes and other files beside the data are ignored):
  data/test-00000-of-00001.parquet                 split from the shard name (lmms-lab/POPE, lmms-lab/textvqa)
  ScienceQA-IMG/test-00000-of-00001.parquet        a configuration per folder (lmms-lab/ScienceQA, wikitext)
  ScienceQA-IMG/test/0000.parquet, test/0.parquet  a folder per split (datasets' refs/convert/parquet export)
  test.parquet                                     a file per split
  items.parquet, part-1.parquet                    no split in the names: every file (the task splits the items)
A split found under several configurations is read from the one named by `config` (a task's default, e.g.
ScienceQA-IMG), else one error lists them. Hidden folders (.cache, .git) are skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

SPLIT_FOLDERS = ("train", "validation", "test", "val", "dev")  # folder names taken as a split (datasets' export)
SHARD = re.compile(r"(?P<split>[A-Za-z][\w.]*?)-\d+-of-\d+\.parquet")


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as `datasets.load_dataset` takes it


def is_hub_name(data) -> bool:
    """Whether `data` names a dataset for `datasets` ("lmms-lab/POPE") rather than a local path (none exists)."""
    return isinstance(data, str) and bool(HUB_NAME.fullmatch(data)) and not Path(data).exists()


def parquet_files(root: Path) -> list[Path]:
    """Every .parquet file under `root`, sorted, outside hidden folders."""
    return sorted(p for p in root.rglob("*.parquet")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))


def file_split(path: Path) -> str | None:
    """The published split a file holds, from its shard name, its folder or its stem; None when nothing says."""
    shard = SHARD.fullmatch(path.name)
    if shard:
        return shard["split"]
    if path.parent.name in SPLIT_FOLDERS:
        return path.parent.name
    return path.stem if path.stem in SPLIT_FOLDERS else None


def configuration(path: Path, root: Path) -> str:
    """The folder that holds a file's splits, relative to `root` ("." at the top): a split folder is not one."""
    folder = path.parent.relative_to(root)
    if path.parent.name in SPLIT_FOLDERS and not SHARD.fullmatch(path.name):
        folder = folder.parent
    return str(folder)


def splits(root: Path) -> set[str]:
    """The published splits a dataset folder holds."""
    return {s for s in map(file_split, parquet_files(root)) if s}


def split_files(root: Path, split: str, *, config: str | None = None) -> list[Path]:
    """The parquet files of `split` in the dataset folder `root` (see the module docstring); one clear error when
    there are none, when the split is missing, or when several configurations hold it and `config` names none."""
    files = parquet_files(root)
    if not files:
        raise ValueError(f"--data {root} holds no .parquet files (its subfolders searched too); pass a parquet file, "
                         "a dataset folder as downloaded, or a .jsonl file")
    named = {f: file_split(f) for f in files}
    if not any(named.values()):
        return files
    chosen = [f for f in files if named[f] == split]
    if not chosen:
        have = ", ".join(sorted({s for s in named.values() if s}))
        raise ValueError(f"--data {root} holds no {split!r} split (it has {have}); pass source_split= one of those")
    groups: dict[str, list[Path]] = {}
    for f in chosen:
        groups.setdefault(configuration(f, root), []).append(f)
    if len(groups) == 1:
        return chosen
    picked = [g for g in groups if config is not None and config in Path(g).parts]
    if len(picked) == 1:
        return groups[picked[0]]
    raise ValueError(f"--data {root} holds the {split!r} split in {len(groups)} configurations "
                     f"({', '.join(sorted(groups))}); point --data at one of them")
