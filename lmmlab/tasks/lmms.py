"""lmms-eval, the harness LLaVA results are reported with, run offline on local parquet files over a loaded lmmlab
model and its per-layer KV cache.

`evaluate_lmms(loaded, ["pope"], data={"pope": "POPE/data"}, plan=plan)` runs lmms-eval's own evaluator
(`simple_evaluate`) with `loaded` behind the registered lmms-eval model "lmmlab" (`lmmlab.tasks.lmms_model`), each
request through a fresh `kv_cache_for(plan, loaded)` (transformers' DynamicCache without a plan), on lmms-eval's
packaged task configs pointed at local files: the YAML templates in `lmms_tasks/` `include` the packaged
scienceqa_img / pope / textvqa_val configs (prompts, generation settings, metrics unchanged) and replace only where
the data comes from (`dataset_path: parquet`, `dataset_kwargs: {data_files: ...}`), with the hub switched off.

Data: per task, a parquet file or a folder of them in the lmms-lab layout (the shards `{split}-*.parquet` of the
split lmms-eval's config reads when the folder holds them, else every .parquet file), the image column either as
`datasets` writes it or as {"bytes", "path"} structs (`decode_images` casts it). lmmlab's own tasks
(`lmmlab.tasks.vqa`) read the same files.

Needs lmms-eval, installed without its CUDA torch and torchvision: `make lmms`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterator, Mapping

from lmmlab.files import cache_dir as lmmlab_cache_dir
from lmmlab.tasks.base import check_data_path

if TYPE_CHECKING:
    from lmmlab.plan import CompressionPlan

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "lmms_tasks"
INCLUDE = re.compile(r'^include: "\$\{lmms_eval_tasks\}/(.+)"$', re.MULTILINE)
DEFAULT_BOOTSTRAP_ITERS = 1000  # lm-eval's default for the harness adapter; lmms-eval's own is 100000
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


# --- the tasks on offer ------------------------------------------------------------------------------------------

def lmms_task_templates() -> dict[str, str]:
    """Each task lmmlab runs through lmms-eval, with the packaged config (relative to lmms_eval/tasks) it includes."""
    found = {}
    for path in sorted(TEMPLATES.glob("*.yaml")):
        match = INCLUDE.search(path.read_text())
        if match is None:
            raise ValueError(f"{path} has no `include: \"${{lmms_eval_tasks}}/...\"` line")
        found[path.stem] = match.group(1)
    return found


def _check_task_names(tasks) -> list[str]:
    known = lmms_task_templates()
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lmms-eval task names ({', '.join(known)}), got {tasks!r}")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s) {', '.join(map(repr, unknown))}; available: {', '.join(known)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat a name, got {tasks!r}")
    return list(tasks)


def check_lmms_tasks(tasks) -> list[str]:
    """The task names, checked before any model loads: each one lmmlab offers and the installed lmms-eval ships a
    config for (one line naming the available ones otherwise); lmms-eval missing is a ModuleNotFoundError that says
    `make lmms`."""
    tasks = _check_task_names(tasks)
    _adapter()
    _packaged_configs(tasks)
    return tasks


def _adapter():
    """lmmlab.tasks.lmms_model, which imports lmms-eval (one clear error when it is not installed)."""
    import importlib

    return importlib.import_module("lmmlab.tasks.lmms_model")


def _packaged_configs(tasks: list[str]) -> tuple[Path, dict[str, str]]:
    """The installed lmms_eval/tasks folder and the split each task's packaged config evaluates; a task whose config
    this lmms-eval lacks fails with one line."""
    import lmms_eval.tasks
    from lmms_eval.utils import load_yaml_config

    root = Path(lmms_eval.tasks.__file__).parent
    templates = lmms_task_templates()
    missing = [t for t in tasks if not (root / templates[t]).is_file()]
    if missing:
        have = [t for t, rel in templates.items() if (root / rel).is_file()]
        raise ValueError(f"the installed lmms-eval has no packaged config for {', '.join(missing)} (looked for "
                         f"{', '.join(templates[t] for t in missing)} under {root}); available: {', '.join(have)}")
    splits = {}
    for task in tasks:
        config = load_yaml_config(yaml_path=str(root / templates[task]), mode="simple")
        splits[task] = config.get("test_split") or config.get("validation_split")
    return root, splits


# --- data ----------------------------------------------------------------------------------------------------------

def _parquet_files(task: str, path, split: str) -> list[str]:
    path = check_data_path(path)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"data for {task}: {path} is not a .parquet file (lmms-eval reads the parquet layout)")
        return [str(path.resolve())]
    files = sorted(path.glob(f"{split}-*.parquet")) or sorted(path.glob("*.parquet"))
    if not files:
        raise ValueError(f"data for {task}: {path} holds no .parquet files")
    return [str(f.resolve()) for f in files]


def _data_files(tasks: list[str], data, splits: dict[str, str]) -> dict[str, list[str]]:
    """The parquet files of each task: `data` maps task names to paths (a bare path serves a single task)."""
    if not isinstance(data, Mapping):
        if len(tasks) != 1:
            raise ValueError(f"data must map each task to its parquet file or folder, e.g. {{{tasks[0]!r}: PATH}}")
        data = {tasks[0]: data}
    extra = sorted(set(data) - set(tasks))
    if extra:
        raise ValueError(f"data names task(s) {', '.join(map(repr, extra))} that are not evaluated ({', '.join(tasks)})")
    missing = [t for t in tasks if data.get(t) is None]
    if missing:
        raise ValueError(f"no data for {', '.join(missing)}: pass data={{{missing[0]!r}: PATH}} (a parquet file or "
                         "a folder of them)")
    return {t: _parquet_files(t, data[t], splits[t]) for t in tasks}


def check_data(tasks: list[str], data) -> None:
    """`data` for `tasks` checked as `evaluate_lmms` reads it (every task has a parquet file or folder of them)."""
    _data_files(tasks, data, _packaged_configs(tasks)[1])


def decode_images(dataset):
    """lmms-eval's `process_docs`: the image column as `datasets` images, whether the parquet file was written by
    `datasets` (already so) or holds plain {"bytes", "path"} structs (pandas)."""
    import datasets

    feature = dataset.features.get("image")
    if feature is None or isinstance(feature, datasets.Image):
        return dataset
    return dataset.cast_column("image", datasets.Image())


def _write_configs(folder: Path, files: dict[str, list[str]], root: Path, splits: dict[str, str],
                   cache: Path) -> None:
    """The templates filled in (every value as a JSON string, which YAML reads as it is) for lmms-eval."""
    folder.mkdir(parents=True, exist_ok=True)
    for task, paths in files.items():
        text = string.Template((TEMPLATES / f"{task}.yaml").read_text()).substitute(
            lmms_eval_tasks=json.dumps(str(root))[1:-1], split=json.dumps(splits[task]),
            data_files=json.dumps(paths), cache_dir=json.dumps(str(cache)))
        (folder / f"{task}.yaml").write_text(text)


@contextmanager
def offline() -> Iterator[None]:
    """No hub: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set, in the environment and in the constants huggingface_hub
    and datasets read them into at import; everything restored afterwards."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {name: os.environ.get(name) for name in OFFLINE_ENV}
    patches = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
               (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in patches if hasattr(module, name)]
    os.environ.update({name: "1" for name in OFFLINE_ENV})
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for name, value in saved_env.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


# --- the run -------------------------------------------------------------------------------------------------------

def evaluate_lmms(loaded, tasks: list[str], *, data, plan: CompressionPlan | None = None,
                  limit: int | float | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
                  seed: int = 0, bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS, log_samples: bool = True,
                  cache_dir: str | Path | None = None, output_path: str | Path | None = None) -> dict:
    """lmms-eval's `simple_evaluate` on `tasks` (scienceqa_img, pope, textvqa_val) over local parquet `data`
    ({task: file or folder}), offline, with `loaded` behind the "lmmlab" model and a per-layer KV cache from `plan`
    (its kv widths; the model should already carry its sparsity). Returns lmms-eval's result dict:
    `results[task]["<metric>,none"]`, and per-document `samples` when `log_samples`. `max_new_tokens` overrides
    every task's generation length (lmms-eval's gen_kwargs); `cache_dir` holds the `datasets` copies of the files
    (default: lmmlab's cache); `output_path` gets what tasks write (TextVQA's submission file; default: a temporary
    folder, removed)."""
    tasks = _check_task_names(tasks)
    adapter = _adapter()
    root, splits = _packaged_configs(tasks)
    files = _data_files(tasks, data, splits)
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    model = adapter.LmmlabLMMS(loaded, _cache_factory(plan, loaded), batch_size=batch_size)
    cache = Path(cache_dir) if cache_dir is not None else lmmlab_cache_dir() / "lmms-eval-datasets"
    with tempfile.TemporaryDirectory(prefix="lmmlab-lmms-") as tmp, offline():
        _write_configs(Path(tmp) / "tasks", files, root, splits, cache)
        results = _run(model, tasks, Path(tmp), output_path, limit=limit, seed=seed, log_samples=log_samples,
                       bootstrap_iters=bootstrap_iters,
                       gen_kwargs=None if max_new_tokens is None else f"max_new_tokens={max_new_tokens}")
    log.info("lmms-eval %s: %s", ", ".join(tasks), results["results"])
    return results


def _cache_factory(plan, loaded):
    """A zero-argument factory of the plan's per-layer KV cache (None: transformers' DynamicCache); one cache is
    built here so a plan that does not fit the model fails before any request."""
    if plan is None:
        return None
    from lmmlab.kv.cache import KVCacheFactory, kv_cache_for

    kv_cache_for(plan, loaded)
    return KVCacheFactory(plan, loaded)


def _run(model, tasks: list[str], tmp: Path, output_path, **options) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    absent = [t for t in tasks if t not in manager.all_tasks]
    if absent:
        raise ValueError(f"lmms-eval did not index task(s) {', '.join(absent)} from lmmlab's configs "
                         f"(it found {', '.join(manager.all_tasks) or 'none'})")
    # lmms-eval reads `output_path` (where TextVQA writes its submission file) and `process_with_media` from its CLI
    # arguments; without them it writes to the working folder.
    args = SimpleNamespace(output_path=str(output_path or tmp / "output"), process_with_media=False)
    seed = options.pop("seed")
    return simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, cli_args=args, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, **options)


def __getattr__(name: str):
    if name == "LmmlabLMMS":  # the registered lmms-eval model, importable from here once lmms-eval is installed
        return _adapter().LmmlabLMMS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
