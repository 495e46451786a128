"""What every notebook and command starts with: the task (checked before any model loads), the model (checked against
the task), the calibrated pruner, and where results go."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmmlab.files import results_root
from lmmlab.models import DEFAULT_MODEL, Loaded, load_model
from lmmlab.tasks import Task, get_task


@dataclass
class Session:
    loaded: Loaded
    task: Task
    results: Path
    storage: str  # Optuna storage URL
    tag: str = field(default="")  # prefix for this model and task's tables and figures ("" for the toy on shapes)

    @property
    def tables(self) -> Path:
        return self.results / "tables"

    @property
    def figures(self) -> Path:
        return self.results / "figures"

    def name(self, stem: str) -> str:
        """A table or figure name: `stem` for the toy on shapes, else prefixed with the model and task."""
        return f"{self.tag}{stem}"


def default_task(model: str) -> str:
    """shapes for the embedded toy LLaVA (the task it was trained on), text for every other model."""
    return "shapes" if model == DEFAULT_MODEL else "text"


def parse_options(texts: list[str]) -> dict:
    """KEY=VALUE task options (`--task-option`), each value as int, float or string."""
    options = {}
    for text in texts:
        if "=" not in text:
            raise ValueError(f"--task-option {text!r} is not KEY=VALUE (e.g. seqlen=256)")
        key, value = text.split("=", 1)
        for convert in (int, float, str):
            try:
                options[key.strip()] = convert(value)
                break
            except ValueError:
                pass
    return options


def build_task(model: str, name: str | None = None, data: str | None = None, options: dict | None = None) -> Task:
    """The task `name` (the model's default when None) with its data and options, checked before any model loads."""
    return get_task(name or default_task(model), data=data, **(options or {}))


def load_checked(model: str, task: Task | None = None, *, dtype: str | None = None, device: str | None = None
                 ) -> Loaded:
    """The model, checked against the task (images on a text-only model are refused)."""
    loaded = load_model(model, dtype=dtype, device=device)
    if task is not None:
        task.check_model(loaded)
    return loaded


def calibrated_pruner(loaded: Loaded, task: Task, *, calibration_task: str | None = None, n: int | None = None,
                      seed: int = 0):
    """A `Pruner` calibrated on `calibration_task`'s default data (e.g. text windows for a LLaVA, as the seed code
    calibrates on C4), else on the task itself."""
    from lmmlab.prune.pruner import Pruner

    source = get_task(calibration_task) if calibration_task and calibration_task != task.name else task
    source.check_model(loaded)
    return Pruner.for_task(loaded, source, n=n, seed=seed)


def model_label(loaded: Loaded) -> str:
    """A short name for file names: smollm2 for SmolLM2-135M, lmmlab-default for the toy, else the folder name."""
    name = Path(loaded.name).name
    return "smollm2" if name.startswith("smollm2") else name


def open_session(model: str = DEFAULT_MODEL, task: str | None = None, data: str | None = None,
                 task_options: dict | None = None, results_dir: str | Path | None = None,
                 storage: str | None = None, seed: int = 0) -> Session:
    """Build the task (checking its options and data first), load the model, and place results and the study DB."""
    torch.manual_seed(seed)
    task_name = task or default_task(model)
    built = get_task(task_name, data=data, **(task_options or {}))
    loaded = load_model(model)
    built.check_model(loaded)
    results = Path(results_dir) if results_dir else results_root()
    toy = model == DEFAULT_MODEL and task_name == "shapes"
    tag = "" if toy else f"{Path(model).name}-{task_name}_"
    return Session(loaded, built, results, storage or f"sqlite:///{results / 'studies.db'}", tag)
