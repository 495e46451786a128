"""A per-layer cost model of batch-1 decoding: a plan's tokens/s and resident bytes, from the bytes each layer reads.

A decode step reads every weight once and the whole KV cache, and does little else, so its seconds are modelled as
a sum over the decoder layers plus what does not depend on depth (embedding row, final norm, LM head):

    t = β_dense·B_dense + β_sparse·B_sparse + β_plain·B_kv16 + β_packed·B_kvq + β_layer·L + β_0

B_dense: bytes of weights read dense (torch's matvec: linears left dense, the LM head, norms); B_sparse: bytes of
the compressed linears (mask + values + offsets, `models.sparse_linear.sparse_nbytes`, read by the sparse kernel);
B_kv16 / B_kvq: bytes of the layers' caches held plain (16 bits) or packed (`kv.budget.kv_nbytes`); L the layers
(per-layer overhead: norms, rotary, attention's small ops, Python). The β are fitted by non-negative least squares
(`scipy.optimize.nnls`) on measured points — the rows of `lmmlab bench e2e` (whole models at sparsity × KV width ×
context) — with seconds-relative weights (each equation divided by its measured time), so the fit minimises relative
error. Because every term is a per-layer sum, a plan with per-layer sparsities and KV widths is predicted by summing
its layers' bytes (`plan_features`). Resident bytes need no fit: the same layout formulas count them exactly; the
process's peak RSS adds a runtime intercept, fitted as the median difference.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FEATURES = ("dense_bytes", "sparse_bytes", "kv16_bytes", "kvq_bytes", "layers", "one")


def linear_decode_bytes(rows: int, columns: int, sparsity: float, element_size: int) -> tuple[int, int]:
    """(dense bytes, sparse bytes) one linear [rows, columns] holds as it decodes at `sparsity`: compressed where
    that is smaller (as `compress_linears` decides), else dense."""
    from lmmlab.models.sparse_linear import sparse_nbytes

    dense = rows * columns * element_size
    sparse = sparse_nbytes(rows, columns, round(rows * columns * (1 - sparsity)), element_size)
    return (0, sparse) if sparsity > 0 and sparse < dense else (dense, 0)


def plan_features(loaded, plan, context: int) -> dict[str, float]:
    """The cost model's features (`FEATURES`) of `plan` on `loaded` after `context` tokens: each decoder layer's
    linears at the plan's ratio, its cache at the plan's key/value widths, plus the rest of the model read dense."""
    from lmmlab.kv.budget import kv_nbytes

    plan.check_layers(loaded.num_layers)
    f = dict.fromkeys(FEATURES, 0.0)
    linear_total = 0
    for i in range(loaded.num_layers):
        for name, linear in loaded.linears(i).items():
            R, C = linear.weight.shape
            dense, sparse = linear_decode_bytes(R, C, plan.ratio(i, name), linear.weight.element_size())
            f["dense_bytes"] += dense
            f["sparse_bytes"] += sparse
            linear_total += R * C * linear.weight.element_size()
        k, v = plan.key_widths[i], plan.value_widths[i]
        held = kv_nbytes([k], loaded.num_kv_heads, loaded.head_dim, context, plan.kv_group_size, plan.kv_residual,
                         value_bits=[v])
        f["kv16_bytes" if k == v == 16 else "kvq_bytes"] += held
    f["dense_bytes"] += rest_bytes(loaded.model) - linear_total
    f["layers"], f["one"] = float(loaded.num_layers), 1.0
    return f


def rest_bytes(model) -> int:
    """Bytes one decode step reads of the model as it is now, but one row of the embedding table: every parameter
    (tied embeddings once, as the LM head)."""
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return held if emb is head else held - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def row_features(row: dict) -> dict[str, float]:
    """The features of a `bench e2e` row (whole model at its full depth): weights read split into the compressed
    linears and the rest, and the cache plain or packed."""
    weights = row["bytes_per_token"] - row["cache_bytes"]
    sparse = row["linear_bytes"] if row["sparsity"] > 0 else 0.0
    plain = row["kv_bits"] == 16
    return {"dense_bytes": weights - sparse, "sparse_bytes": sparse, "kv16_bytes": row["cache_bytes"] * plain,
            "kvq_bytes": row["cache_bytes"] * (not plain), "layers": float(row["full_depth"]), "one": 1.0}


@dataclass
class CostModel:
    """Seconds per decode token = Σ coefficients[f] · features[f] (`FEATURES`); peak RSS = resident bytes +
    `rss_intercept`."""

    coefficients: dict[str, float]
    rss_intercept: float = 0.0
    fitted_on: int = 0
    notes: dict = field(default_factory=dict)

    def seconds(self, features: dict[str, float]) -> float:
        return sum(self.coefficients[f] * features[f] for f in FEATURES)

    def tokens_per_s(self, features: dict[str, float]) -> float:
        """Predicted batch-1 decode tokens/s of a plan with these features."""
        return 1.0 / self.seconds(features)

    def peak_rss(self, resident_bytes: float) -> float:
        return resident_bytes + self.rss_intercept

    def save(self, path: str | Path) -> None:
        from lmmlab.files import write_json

        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls(**json.loads(Path(path).read_text()))


def fit(points: Sequence[tuple[dict[str, float], float]]) -> CostModel:
    """The non-negative least-squares fit of seconds per token on `points` (features, measured seconds), each
    equation weighted by 1 / its seconds (relative error). At least as many points as features."""
    from scipy.optimize import nnls

    points = [(f, s) for f, s in points if s and s > 0]
    if len(points) < len(FEATURES):
        raise ValueError(f"fitting the cost model needs at least {len(FEATURES)} timed points; got {len(points)}")
    A = np.array([[f[name] / s for name in FEATURES] for f, s in points])
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    beta, _ = nnls(A / scale, np.ones(len(points)))
    return CostModel({name: float(b / c) for name, b, c in zip(FEATURES, beta, scale)}, fitted_on=len(points))


def percent_errors(model: CostModel, points: Sequence[tuple[dict[str, float], float]]) -> list[float]:
    """|predicted − measured| / measured seconds per token, in %, per point."""
    return [100 * abs(model.seconds(f) - s) / s for f, s in points]


def fit_e2e(rows: list[dict], *, holdout_every: int = 3, seed: int = 0) -> tuple[CostModel, dict]:
    """Fit on the timed rows of `bench e2e` but a random 1 / `holdout_every` of them (seeded), report the error on
    those held out, then refit on all of them (the model returned) and report its error on every row; the RSS
    intercept is the median of peak RSS − resident bytes. Returns (model, report)."""
    timed = sorted((r for r in rows if r.get("s_per_token") and r["s_per_token"] > 0),
                   key=lambda r: (r["shape"], r["plan"], r["context"], r["kv_bits"]))
    points = [(row_features(r), r["s_per_token"]) for r in timed]
    order = np.random.default_rng(seed).permutation(len(points))
    out = set(order[:len(points) // holdout_every].tolist())
    held = [p for k, p in enumerate(points) if k in out]
    train = [p for k, p in enumerate(points) if k not in out]
    heldout_errors = percent_errors(fit(train), held) if held and len(train) >= len(FEATURES) else []
    model = fit(points)
    model.rss_intercept = float(statistics.median(r["peak_rss_bytes"] - r["resident_bytes"] for r in timed))
    all_errors = percent_errors(model, points)
    rss_errors = [100 * abs(model.peak_rss(r["resident_bytes"]) - r["peak_rss_bytes"]) / r["peak_rss_bytes"]
                  for r in timed]
    report = {"points": len(points), "heldout": len(held),
              "heldout_error_pct": _summary(heldout_errors), "fit_error_pct": _summary(all_errors),
              "peak_rss_error_pct": _summary(rss_errors),
              "per_row": [{"shape": r["shape"], "plan": r["plan"], "context": r["context"], "kv_bits": r["kv_bits"],
                           "measured_tokens_per_s": 1 / s, "predicted_tokens_per_s": model.tokens_per_s(f),
                           "error_pct": e} for r, (f, s), e in zip(timed, points, all_errors)]}
    model.notes = {k: report[k] for k in ("points", "heldout", "heldout_error_pct", "fit_error_pct",
                                          "peak_rss_error_pct")}
    return model, report


def _summary(errors: list[float]) -> dict[str, float] | None:
    if not errors:
        return None
    return {"median": float(statistics.median(errors)), "mean": float(np.mean(errors)), "max": float(max(errors))}
