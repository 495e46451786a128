"""What every notebook starts with: the model, the task and where results go, from papermill parameters."""
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
