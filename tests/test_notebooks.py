"""Every notebook runs headlessly through papermill (smoke sizes) and writes its figures and tables."""
import json

import pandas as pd
import pytest

# papermill is imported inside the tests: it pulls jsonschema's URI grammar, ~6 s of import on every worker's
# collection, and `make test-fast` deselects these tests.

NOTEBOOKS = {
    "01_calibration": (["calibration_samples", "calibration_accuracy_by_kind", "calibration_layers"],
                       {"calibration_layers.csv": {"layer", "outlier_ratio", "max_input_norm", "median_input_norm"},
                        "calibration_dense_test.json": {"primary", "accuracy", "accuracy_colour", "loss"}}),
    "02_tpe_search": (["tpe_convergence", "tpe_best_plan", "tpe_importances"],
                      {"tpe_trials.csv": {"trial", "source", "accuracy", "loss", "best_so_far", "sparsity", "kv_bits"},
                       "tpe_vs_baselines.csv": {"method", "allocation", "accuracy", "memory_bytes"},
                       "tpe_best_plan.json": {"sparsity", "kv_bits", "method"}}),
    "03_ablations": (["ablation_pruning", "ablation_kv", "ablation_samplers"],
                     {"ablation_pruning.csv": {"method", "allocation", "pattern", "target_sparsity", "accuracy"},
                      "ablation_kv.csv": {"kv_plan", "kv_bits", "kv_bytes", "kv_ratio", "accuracy", "loss"},
                      "ablation_samplers.csv": {"sampler", "seed", "trial", "best_so_far", "seconds"}}),
    "04_pareto": (["pareto"], {"pareto_points.csv": {"method", "allocation", "accuracy", "memory_bytes"},
                               "pareto_front.csv": {"accuracy", "memory_bytes", "mean_kv_bits"}}),
    "05_explorer": (["explorer"], {"explorer_preview.csv": {"primary_metric", "primary", "memory_bytes"}}),
}


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_headlessly_and_writes_its_outputs(name, default, tmp_path, request):
    import papermill

    results = tmp_path / "results"
    papermill.execute_notebook(f"notebooks/{name}.ipynb", str(tmp_path / f"{name}.ipynb"),
                               parameters={"smoke": True, "results_dir": str(results)}, progress_bar=False,
                               cwd=str(request.config.rootpath))
    figures, tables = NOTEBOOKS[name]
    for figure in figures:
        path = results / "figures" / f"{figure}.png"
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG", figure
    for table, columns in tables.items():
        path = results / "tables" / table
        if table.endswith(".csv"):
            frame = pd.read_csv(path)
            assert len(frame) > 0 and columns <= set(frame.columns), table
        else:
            assert columns <= set(json.loads(path.read_text())), table


def test_a_notebook_takes_a_model_a_task_and_data(tiny_llama_dir, tmp_path, request):
    """The papermill parameters model / task / data / task_options reach the library: a TPE search on text
    perplexity with a tiny Llama, its tables prefixed with the model and task."""
    import papermill

    corpus = tmp_path / "corpus.txt"
    words = "is there a circle ? what colour is the square ? how many shapes are there ?".split()
    corpus.write_text(" ".join(words[(7 * i) % len(words)] for i in range(4000)))
    results = tmp_path / "results"
    papermill.execute_notebook("notebooks/02_tpe_search.ipynb", str(tmp_path / "out.ipynb"),
                               parameters={"smoke": True, "results_dir": str(results), "model": str(tiny_llama_dir),
                                           "task": "text", "data": str(corpus),
                                           "task_options": {"seqlen": 32, "prefill": 16},
                                           "kv_group_size": 8, "kv_residual": 8},
                               progress_bar=False, cwd=str(request.config.rootpath))
    prefix = f"{tiny_llama_dir.name}-text_"
    trials = pd.read_csv(results / "tables" / f"{prefix}tpe_trials.csv")
    assert set(trials.primary_metric) == {"perplexity"} and (trials.best_so_far == trials.objective.cummin()).all()
    versus = pd.read_csv(results / "tables" / f"{prefix}tpe_vs_baselines.csv")
    assert {"tpe", "uniform", "owl"} <= set(versus.allocation) and (versus.perplexity > 1).all()
    assert (results / "figures" / f"{prefix}tpe_convergence.png").stat().st_size > 5000
