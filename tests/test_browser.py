"""JupyterLab and optuna-dashboard as people see them, in real headless Chromium (tests/browser_server.py: Debian's
package, installed when missing; driven over the DevTools protocol). JupyterLab runs on loopback with a token and
the `lab` extra's extensions; the explorer notebook, executed by papermill on a tiny LLaVA, is opened there: its saved
widget state renders, then it runs again in the browser's kernel and its sparsity slider moves the model. `lmmlab
dashboard` serves a study that a tiny search wrote; its API and its trial list agree. Screenshots:
results/figures/jupyterlab_explorer.png and results/figures/dashboard.png. Unavailable Chromium or JupyterLab: a
skip that says why, a failure under CI=true."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import optuna
import pytest

import browser_server as bs
from lmmlab.tasks import get_task
from lmmlab.tasks import shapes

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "results" / "figures"
NOTEBOOK = "05_explorer.ipynb"
TOKEN = "lmmlab-browser-test"
LIVE_SLIDER = ".widget-slider:not(.jupyter-widgets-disconnected)"


def unavailable(reason: str):
    (pytest.fail if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip)(reason)


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium (installed with apt-get when missing), closed at the end of the session."""
    try:
        browser = bs.Browser()
    except bs.Unavailable as err:
        unavailable(str(err))
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def page(chromium):
    tab = chromium.page()
    yield tab
    tab.close()


# --- JupyterLab and the explorer notebook ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explorer(tiny_llava_dir, tmp_path_factory):
    """notebooks/05_explorer.ipynb executed by papermill at smoke sizes on a tiny LLaVA, in a folder of its own
    (JupyterLab's root), with a Jupyter home of its own that trusts it (so JupyterLab renders its widgets)."""
    import nbformat  # here, not at the top: ~6 s of import (jsonschema's URI grammar) on every worker's collection
    import papermill
    from nbformat.sign import NotebookNotary

    root = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("jupyter-home")
    papermill.execute_notebook(str(ROOT / "notebooks" / NOTEBOOK), str(root / NOTEBOOK), progress_bar=False,
                               parameters={"smoke": True, "model": str(tiny_llava_dir), "task": "shapes",
                                           "results_dir": str(root / "results")}, cwd=str(ROOT))
    notebook = nbformat.read(root / NOTEBOOK, as_version=4)
    (home / "data").mkdir()
    NotebookNotary(data_dir=str(home / "data")).sign(notebook)
    return root, home, notebook


@pytest.fixture(scope="module")
def jupyterlab(explorer, tmp_path_factory):
    """JupyterLab on 127.0.0.1 (a free port, a token), the explorer's folder as its root: its base URL."""
    if importlib.util.find_spec("jupyterlab") is None:
        unavailable("JupyterLab is not installed; run `make lab-deps`")
    root, home, _ = explorer
    port = bs.free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.expose_app_in_browser=True"]
    url = f"http://127.0.0.1:{port}"
    with bs.serve(command, f"{url}/api/status?token={TOKEN}", home / "jupyterlab.log", env=env):
        yield url


def slider_models(notebook) -> list[dict]:
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [m["state"] for m in state.values() if m["model_name"] in ("FloatSliderModel", "IntSliderModel")]


def sliders(page, selector: str = ".widget-slider") -> list[str]:
    """The text (description and readout) of each slider in the page."""
    return page.evaluate(f"Array.from(document.querySelectorAll('{selector}')).map(e => e.innerText)")


def run_all_cells(page) -> None:
    """JupyterLab's "Run All Cells" on the open notebook, in its kernel, once that kernel is idle; returns when every
    cell has run."""
    panel = "Array.from(jupyterapp.shell.widgets('main'))[0]"
    page.wait_for(f"window.jupyterapp && {panel} && {panel}.sessionContext.session && "
                  f"{panel}.sessionContext.session.kernel && {panel}.sessionContext.kernelDisplayStatus === 'idle'")
    page.evaluate(f"jupyterapp.shell.activateById({panel}.id)")
    assert page.evaluate("jupyterapp.commands.execute('notebook:run-all-cells').then(ok => ok)")


def press(page, key: str, code: int) -> None:
    for kind in ("rawKeyDown", "keyUp"):
        page.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


# The explorer's live output, the line of per-layer sparsities (in the box that holds its controls)
LAYER_LINE = (f"document.querySelector('{LIVE_SLIDER}').closest('.widget-vbox').innerText.split('\\n')"
              ".find(line => line.startsWith('sparsity per layer')) || ''")


def layer_line(page) -> str:
    return page.evaluate(LAYER_LINE)


def test_the_explorer_notebook_runs_and_its_sliders_render_and_work_in_jupyterlab(explorer, jupyterlab, page):
    _, _, notebook = explorer
    saved = slider_models(notebook)
    assert [(m["description"], m["value"]) for m in saved] == [("sparsity", 0.6)]  # papermill kept the widget state

    page.goto(f"{jupyterlab}/lab/tree/{NOTEBOOK}?token={TOKEN}")
    page.wait_for("document.querySelectorAll('.widget-slider').length >= 1")
    assert [s.split() for s in sliders(page)] == [["sparsity", "0.60"]]  # the saved state, rendered
    extensions = page.evaluate("JSON.parse(document.getElementById('jupyter-config-data').textContent)"
                               ".federated_extensions.map(e => e.name)")
    assert {"@jupyter-widgets/jupyterlab-manager", "jupyterlab-optuna"} <= set(extensions)

    run_all_cells(page)  # the browser's kernel runs the notebook again: the widgets come alive
    page.wait_for(f"document.querySelectorAll('{LIVE_SLIDER}').length >= 1")
    assert [s.split() for s in sliders(page, LIVE_SLIDER)] == [["sparsity", "0.60"]]
    before = layer_line(page)
    assert before.startswith("sparsity per layer:"), before
    page.evaluate(f"document.querySelector('{LIVE_SLIDER} .noUi-handle').focus()")
    press(page, "ArrowRight", 39)  # one step (0.05) up: the kernel re-masks and re-evaluates
    page.wait_for(f"document.querySelector('{LIVE_SLIDER}').innerText.includes('0.65')", timeout=30)
    after = page.wait_for(f"(line => line !== {json.dumps(before)} && line)({LAYER_LINE})", timeout=60)
    assert after.startswith("sparsity per layer:"), after
    assert sum(map(float, after.split(":")[1].split())) > sum(map(float, before.split(":")[1].split()))
    page.evaluate(f"document.querySelector('{LIVE_SLIDER}').scrollIntoView({{block: 'start'}})")
    png = page.screenshot(FIGURES / "jupyterlab_explorer.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20000


# --- optuna-dashboard on a study of a tiny search ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tiny_llama_dir, tmp_path_factory):
    """A study written by lmmlab's per-layer search: 4 trials on a tiny Llama's text perplexity."""
    from lmmlab.models import load_model
    from lmmlab.search.per_layer import PerLayerConfig, search

    folder = tmp_path_factory.mktemp("study")
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(shapes.vocabulary()) for _ in range(6000)))
    task = get_task("text", data=str(corpus), seqlen=32, prefill=16, chunk=4)
    storage = f"sqlite:///{folder / 'study.db'}"
    result = search(load_model(tiny_llama_dir, device="cpu"), task, PerLayerConfig(
        target_sparsity=0.5, kv_budget_bits=4, n_trials=4, n_eval=4, kv_group_size=8, kv_residual=8), storage=storage)
    return storage, result.study


@pytest.fixture(scope="module")
def dashboard(study, tmp_path_factory):
    storage, _ = study
    port = bs.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    with bs.serve([sys.executable, "-m", "lmmlab", "dashboard", "--storage", storage, "--port", str(port)],
                  f"{url}/api/studies", log):
        yield url


def test_the_dashboard_lists_the_studys_trials(study, dashboard, page):
    _, ours = study
    trials = ours.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    summaries = bs.get_json(f"{dashboard}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == [ours.study_name]
    study_id = summaries[0]["study_id"]
    served = bs.get_json(f"{dashboard}/api/studies/{study_id}?after=0")
    assert [(t["number"], t["state"], t["values"]) for t in served["trials"]] == [
        (t.number, "Complete", [pytest.approx(t.value)]) for t in trials]
    assert served["best_trials"][0]["number"] == ours.best_trial.number

    page.goto(f"{dashboard}/dashboard/studies/{study_id}/trials")
    page.wait_for(f"document.body.innerText.includes('{len(trials)} Trials')")
    text = page.evaluate("document.body.innerText")
    assert ours.study_name in text
    assert all(f"Trial {t.number}\nComplete" in text for t in trials)
    png = page.screenshot(FIGURES / "dashboard.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20000
