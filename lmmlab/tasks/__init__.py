"""Tasks: what a model is scored on (the shapes quiz, text perplexity, multimodal benchmarks), apart from the engine."""
from lmmlab.tasks.base import (SPLITS, CacheFactory, Metrics, Task, get_task, register, task_names,
                               task_options)
