"""CompressionPlan: the one currency between allocation, pruning, the KV cache, search, the CLI and notebooks.

A plan says, for every decoder layer of the language model, which fraction of each prunable linear's weights to
remove and how many bits each stored key/value gets, plus the pruning method and pattern shared by all layers.

Keys and values may have their own widths (KVTuner): `kv_bits` alone gives both parts of layer i the width
kv_bits[i]; with `value_bits` too, kv_bits[i] is layer i's key width and value_bits[i] its value width. A layer then
costs the mean of its two parts, (k_i + v_i) / 2 bits, and `mean_kv_bits` is the mean of that over layers, so a budget
on it is a budget on the combined mean. `value_bits` is kept as given (also when equal to kv_bits: such a plan stores
exactly what the kv_bits-only plan stores, but compares unequal to it) and left out of the JSON when empty, so a plan
without it writes the same JSON as before.

Linears may have their own ratios too (EvoPress's per-module levels): `module_sparsity[i]` maps a linear's short name
(q_proj, ..., down_proj) to its ratio in layer i, and `sparsity[i]` is then the layer's parameter-weighted mean (what
the plan says about the layer as a whole; `CompressionPlan.per_module` computes it). A linear the map leaves out takes
its layer's `sparsity[i]`. Empty (the default) = every linear at its layer's ratio; left out of the JSON then.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lmmlab.files import write_text_atomic
from lmmlab.kv.budget import (KIVI_GROUP_SIZE, KIVI_RESIDUAL, KV_CONTEXT, check_kv_bits, check_kv_layout,
                              effective_bits, effective_key_bits, effective_value_bits)

METHODS = ("magnitude", "wanda", "ria", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"bad pattern {pattern!r}; allowed: 'unstructured' or 'N:M' such as '2:4' or '4:8'") from None
    if not 0 < n < m:
        raise ValueError(f"bad pattern {pattern!r}: N:M needs 0 < N < M (N weights kept in every M)")
    return n, m


def pattern_sparsity(pattern: str, sparsity: float) -> float:
    """The ratio a pattern removes: N:M fixes it at 1 − N/M, unstructured takes `sparsity` (checked in [0, 1))."""
    nm = parse_pattern(pattern)
    ratio = 1 - nm[0] / nm[1] if nm else sparsity
    if not 0 <= ratio < 1:
        raise ValueError(f"--sparsity must be in [0, 1); got {ratio}")
    return ratio


@dataclass
class CompressionPlan:
    """Per-layer sparsity and KV bit-widths (keys and values alike, or each at its own); validated on construction;
    JSON round-trip."""

    sparsity: list[float]  # fraction of weights removed, per decoder layer, in [0, 1)
    kv_bits: list[int] = field(default_factory=list)  # bits per stored K/V element (the keys' alone when value_bits
    #                                                   is given), per layer; empty = all 16
    method: str = "wanda"
    pattern: str = "unstructured"  # or "N:M"
    vision_sparsity: float = 0.0  # the vision tower's and projector's linears; 0 leaves them dense
    kv_group_size: int = KIVI_GROUP_SIZE  # tokens per key group (per channel), channels per value group (per token)
    kv_residual: int = KIVI_RESIDUAL  # keys: quantized R at a time when the window fills; values: the newest R kept
    value_bits: list[int] = field(default_factory=list)  # bits per stored value, per layer; empty = kv_bits (then
    #                                                      kv_bits are both parts' widths, else the keys')
    module_sparsity: list[dict[str, float]] = field(default_factory=list)  # per layer {linear name: ratio}; empty =
    #                                                                       each linear at its layer's sparsity

    def __post_init__(self) -> None:
        self.sparsity = [float(s) for s in self.sparsity]
        if not self.sparsity:
            raise ValueError("a plan needs a sparsity for at least one layer")
        bad = [(i, s) for i, s in enumerate(self.sparsity) if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"sparsity must be in [0, 1) for every layer; got {bad[0][1]} at layer {bad[0][0]}")
        self.kv_bits = [int(b) for b in self.kv_bits] or [16] * len(self.sparsity)
        if len(self.kv_bits) != len(self.sparsity):
            raise ValueError(f"kv_bits has {len(self.kv_bits)} entries but sparsity has {len(self.sparsity)}; "
                             "give one per decoder layer")
        check_kv_bits(self.kv_bits)
        self.value_bits = [int(b) for b in self.value_bits]
        if self.value_bits and len(self.value_bits) != len(self.sparsity):
            raise ValueError(f"value_bits has {len(self.value_bits)} entries but sparsity has {len(self.sparsity)}; "
                             "give one per decoder layer, or none for values at the kv_bits widths")
        check_kv_bits(self.value_bits, "value bit-width")
        self.module_sparsity = [{str(k): float(v) for k, v in layer.items()} for layer in self.module_sparsity]
        if self.module_sparsity and len(self.module_sparsity) != len(self.sparsity):
            raise ValueError(f"module_sparsity has {len(self.module_sparsity)} entries but sparsity has "
                             f"{len(self.sparsity)}; give one {{linear: ratio}} map per decoder layer, or none")
        bad = [(i, n, s) for i, layer in enumerate(self.module_sparsity) for n, s in layer.items() if not 0 <= s < 1]
        if bad:
            raise ValueError(f"module sparsity must be in [0, 1); got {bad[0][2]} for {bad[0][1]} of layer {bad[0][0]}")
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; allowed: {', '.join(METHODS)}")
        self.vision_sparsity = float(self.vision_sparsity)
        if not 0.0 <= self.vision_sparsity < 1.0:
            raise ValueError(f"vision_sparsity must be in [0, 1); got {self.vision_sparsity}")
        check_kv_layout(self.kv_group_size, self.kv_residual)
        nm = parse_pattern(self.pattern)
        if nm is not None and self.module_sparsity:
            raise ValueError(f"pattern {self.pattern} fixes every linear's sparsity; per-linear ratios "
                             "(module_sparsity) need an unstructured pattern")
        if nm is not None:
            n, m = nm
            fixed = 1 - n / m
            off = [(i, s) for i, s in enumerate(self.sparsity) if s not in (0.0, fixed)]
            if self.vision_sparsity not in (0.0, fixed):
                off.append(("vision", self.vision_sparsity))
            if off:
                raise ValueError(f"pattern {self.pattern} fixes each layer's sparsity at {fixed:g} (or 0 to skip a "
                                 f"layer); got {off[0][1]} at layer {off[0][0]}")

    @property
    def num_layers(self) -> int:
        return len(self.sparsity)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def ratio(self, layer: int, name: str) -> float:
        """The fraction of linear `name`'s weights that layer `layer` removes: its own ratio when `module_sparsity`
        gives one, else the layer's."""
        if self.module_sparsity:
            return self.module_sparsity[layer].get(name, self.sparsity[layer])
        return self.sparsity[layer]

    @property
    def per_linear(self) -> bool:
        """Whether some linear has a ratio of its own (`module_sparsity`)."""
        return any(s != self.sparsity[i] for i, layer in enumerate(self.module_sparsity) for s in layer.values())

    @property
    def mean_sparsity(self) -> float:
        return sum(self.sparsity) / self.num_layers

    @property
    def key_widths(self) -> list[int]:
        """Each layer's key width (`kv_bits`)."""
        return list(self.kv_bits)

    @property
    def value_widths(self) -> list[int]:
        """Each layer's value width: `value_bits` when given, else `kv_bits`."""
        return list(self.value_bits or self.kv_bits)

    @property
    def separate_kv(self) -> bool:
        """Whether some layer stores its keys and values at different widths."""
        return self.value_widths != self.key_widths

    @property
    def mean_key_bits(self) -> float:
        return sum(self.key_widths) / self.num_layers

    @property
    def mean_value_bits(self) -> float:
        return sum(self.value_widths) / self.num_layers

    @property
    def mean_kv_bits(self) -> float:
        """The mean nominal width over layers of (k_i + v_i) / 2 (16 = as the model's states come); with keys and
        values alike, the mean of kv_bits."""
        return (self.mean_key_bits + self.mean_value_bits) / 2

    def effective_kv_bits(self, head_dim: int, context: int = KV_CONTEXT, part: str = "both") -> list[float]:
        """Per layer, the bits per stored K/V element after `context` tokens: packed codes, fp16 scales and zero
        points and the full-precision windows; a 16-bit part as fp16 storage. `part` "both" counts the layer's keys
        and values together, each at its own width (`kvcache.effective_bits`), "key" or "value" one part alone
        (`kvcache.effective_key_bits`, `effective_value_bits`); "both" is the mean of the two."""
        layout = dict(head_dim=head_dim, context=context, group_size=self.kv_group_size,
                      residual_length=self.kv_residual)
        if part == "key":
            return [effective_key_bits(k, **layout) for k in self.key_widths]
        if part == "value":
            return [effective_value_bits(v, **layout) for v in self.value_widths]
        if part != "both":
            raise ValueError(f"unknown KV part {part!r}; allowed: both, key, value")
        return [effective_bits(k, value_bits=v, **layout) for k, v in zip(self.key_widths, self.value_widths)]

    def mean_effective_kv_bits(self, head_dim: int, context: int = KV_CONTEXT, part: str = "both") -> float:
        return sum(self.effective_kv_bits(head_dim, context, part)) / self.num_layers

    def removed_weights(self, numel: list[dict[str, int]]) -> int:
        """Weights the plan removes from linears of `numel[i][name]` weights: ⌊numel · ratio⌋ each, summed."""
        return sum(int(n * self.ratio(i, name)) for i, layer in enumerate(numel) for name, n in layer.items())

    def weight_summary(self, weights_per_layer: list[int], bytes_per_weight: int) -> dict:
        """What the plan means for the prunable weights: kept (non-zero) weights and their bytes, dense vs pruned."""
        self.check_layers(len(weights_per_layer))
        kept = sum(round(n * (1 - s)) for n, s in zip(weights_per_layer, self.sparsity))
        dense = sum(weights_per_layer)
        return {"dense_weights": dense, "kept_weights": kept, "dense_bytes": dense * bytes_per_weight,
                "kept_bytes": kept * bytes_per_weight, "achieved_sparsity": 1 - kept / dense}

    def check_layers(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise ValueError(f"plan has {self.num_layers} layers but the model has {num_layers} decoder layers")

    @classmethod
    def uniform(cls, num_layers: int, sparsity: float = 0.0, kv_bits: int = 16, method: str = "wanda",
                pattern: str = "unstructured", value_bits: int | None = None, **options) -> "CompressionPlan":
        """The same sparsity and KV width in every layer (`kv_bits` for keys and values, or for keys only when
        `value_bits` is given); `options` are the remaining fields."""
        values = [] if value_bits is None else [value_bits] * num_layers
        return cls([sparsity] * num_layers, [kv_bits] * num_layers, method, pattern, value_bits=values, **options)

    @classmethod
    def per_module(cls, ratios: list[dict[str, float]], numel: list[dict[str, int]], kv_bits: list[int] | None = None,
                   **options) -> "CompressionPlan":
        """A plan with a ratio per linear (`ratios[i][name]`); each layer's `sparsity` is the `numel`-weighted mean
        of its linears' ratios. `options` are the remaining fields."""
        if len(ratios) != len(numel):
            raise ValueError(f"{len(ratios)} layers of ratios for a model of {len(numel)} decoder layers")
        means = [sum(layer[n] * numel[i][n] for n in layer) / sum(numel[i][n] for n in layer)
                 for i, layer in enumerate(ratios)]
        return cls(means, list(kv_bits or []), module_sparsity=[dict(layer) for layer in ratios], **options)

    def to_json(self) -> str:
        """The fields as a JSON object; `value_bits` and `module_sparsity` only when given."""
        raw = asdict(self)
        for optional in ("value_bits", "module_sparsity"):
            if not raw[optional]:
                del raw[optional]
        return json.dumps(raw, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"plan is not valid JSON: {err}") from None
        if not isinstance(raw, dict) or "sparsity" not in raw:
            raise ValueError("plan JSON must be an object with at least a 'sparsity' list")
        allowed = [f.name for f in fields(cls)]
        unknown = set(raw) - set(allowed)
        if unknown:
            raise ValueError(f"unknown plan field(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CompressionPlan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file at {path}")
        return cls.from_json(path.read_text())
