"""Pruned linears kept compressed in memory: `SparseLinear` holds a weight in the bitmask layout of
`lmmlab.models.sparse_kernels` (a row-major bitmask, the kept values, per-row offsets) instead of the dense matrix, and
multiplies straight from it when decoding.

forward(x [..., C]):
  ≤ 4 tokens (decode)   the C kernel reads the mask and values once, never building the dense weight (on the CPU; the
                        AVX-512, AVX2 or portable path, `sparse_kernels.matvec`); the work is the weight's bytes
  more tokens (prefill) blocks of rows decompressed in turn (≤ BLOCK_ELEMENTS dense elements at a time) and multiplied
                        with torch; the same path serves CUDA and machines without a C compiler
`compress_linears(model)` swaps the prunable linears of the decoder layers for SparseLinears where that shrinks them
(on CUDA, a 2:4 weight becomes torch's semi-structured sparse tensor instead, where torch can), after which
`is_compressed(model)` is true and `refuse_compressed` stops a second pruning: the masks are baked into the layout.
Inference only: there is no gradient through the compressed weight.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lmmlab.models.adapter import PRUNABLE, Loaded, decoder_layers, load_model
from lmmlab.models.sparse_kernels import KINDS, MAX_TOKENS, PAD, compress, matvec, row_bytes, unpack_rows

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 21  # dense weight elements decompressed at a time for prefill (8 MiB in fp32)


def sparse_nbytes(rows: int, columns: int, kept: int, element_size: int, bias_bytes: int = 0) -> int:
    """Resident bytes of a SparseLinear: mask R·P + values (Z + PAD)·e + offsets 8·(R + 1) + the bias."""
    return rows * row_bytes(columns) + (kept + PAD) * element_size + 8 * (rows + 1) + bias_bytes


class SparseLinear(nn.Module):
    """A pruned linear y = x Wᵀ + b whose W [out, in] is held as bitmask + kept values + row offsets (buffers
    `mask`, `values`, `offsets`); the dense W exists only a block of rows at a time, in prefill."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, values: torch.Tensor,
                 offsets: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("mask", mask)  # uint8 [out, P]
        self.register_buffer("values", values)  # [Z + PAD]
        self.register_buffer("offsets", offsets)  # int64 [out + 1]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dtype: torch.dtype | None = None) -> SparseLinear:
        """The compressed copy of `linear` (kept: its weight's non-zeros), values in `dtype` (default: the weight's:
        float32, float16 or bfloat16). The dense weight is freed once the linear itself is dropped."""
        W = linear.weight.detach()  # [out, in]
        dtype = dtype or W.dtype
        if dtype not in KINDS:
            raise ValueError(f"SparseLinear cannot hold {dtype} values; allowed: float32, float16, bfloat16")
        mask, values, offsets = compress(W, dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(W.shape[1], W.shape[0], mask, values, offsets, bias)

    @property
    def kept(self) -> int:
        """Z, the kept (non-zero) weights."""
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes the module holds in memory: its buffers and bias."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def to_dense(self) -> torch.Tensor:
        """The dense weight [out, in] in the values' dtype (zeros where pruned)."""
        return unpack_rows(self.mask, self.values, self.offsets, 0, self.out_features, self.in_features)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype, a block of dense rows decompressed and multiplied at a time."""
        rows = max(1, BLOCK_ELEMENTS // max(self.in_features, 1))
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for r0 in range(0, self.out_features, rows):
            r1 = min(self.out_features, r0 + rows)
            W = unpack_rows(self.mask, self.values, self.offsets, r0, r1, self.in_features)  # [r1 - r0, in]
            y[:, r0:r1] = x @ W.to(x.dtype).T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: the sparse kernel for ≤ 4 tokens on the CPU, dense blocks otherwise."""
        flat = x.reshape(-1, self.in_features)  # [T, in]
        y = matvec(self.mask, self.values, self.offsets, flat) if flat.shape[0] <= MAX_TOKENS else None
        y = self._blocks(flat) if y is None else y.to(x.dtype)  # [T, out]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.kept / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={density:.3f}, values={self.values.dtype}")


# ---------------------------------------------------------------------------------------------------- whole models

def _follows_24(W: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive weights of a row."""
    R, C = W.shape
    return C % 4 == 0 and bool(((W.reshape(R, C // 4, 4) != 0).sum(-1) <= 2).all())


def _is_semi_structured(weight: torch.Tensor) -> bool:
    return type(weight).__name__.startswith("SparseSemiStructured")


def semi_structured(linear: nn.Linear) -> bool:
    """On CUDA, swap a 2:4 linear's fp16/bf16 weight for torch's semi-structured sparse tensor (its own sparse GEMM);
    False, leaving the linear as it was, where the device, dtype, pattern, shape or torch cannot take it."""
    W = linear.weight.detach()
    if not W.is_cuda or W.dtype not in (torch.float16, torch.bfloat16) or not _follows_24(W):
        return False
    try:
        from torch.sparse import to_sparse_semi_structured

        linear.weight = nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
    except (ImportError, RuntimeError, ValueError, NotImplementedError) as err:
        log.info("semi-structured 2:4 unavailable for a %s weight (%s): kept as a bitmask", tuple(W.shape), err)
        return False
    return True


def _linear_bytes(linear: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*linear.parameters(), *linear.buffers()))


def _sparse_saving(linear: nn.Linear, dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes now, bytes as a SparseLinear with values in `dtype`) of one linear."""
    W = linear.weight.detach()
    element = torch.empty(0, dtype=dtype or W.dtype).element_size()
    bias = 0 if linear.bias is None else linear.bias.numel() * linear.bias.element_size()
    return _linear_bytes(linear), sparse_nbytes(*W.shape, int(torch.count_nonzero(W)), element, bias)


def prunable_slots(model: nn.Module | Loaded) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent module, attribute, linear) of every prunable linear of the decoder layers."""
    layers = model.layers if isinstance(model, Loaded) else decoder_layers(model)
    found = []
    for layer in layers:
        for name, module in layer.named_modules():
            parent, _, short = name.rpartition(".")
            if isinstance(module, nn.Linear) and short in PRUNABLE:
                found.append((layer.get_submodule(parent), short, module))
    return found


def compress_linears(model: nn.Module | Loaded, *, min_saving: float = 0.0, dtype: torch.dtype | None = None,
                     semi: bool = True) -> dict[str, int]:
    """Swap every prunable linear of the decoder layers for a SparseLinear (values in `dtype`, default the weight's)
    where that saves more than `min_saving` (a fraction) of its bytes; the others stay dense. On CUDA a 2:4 weight
    becomes torch's semi-structured tensor instead (`semi`). Returns the linears' bytes before and after, and counts."""
    if not 0.0 <= min_saving < 1.0:
        raise ValueError(f"min_saving must be a fraction in [0, 1); got {min_saving}")
    out = {"bytes_before": 0, "bytes_after": 0, "compressed": 0, "semi_structured": 0, "kept_dense": 0}
    for parent, short, linear in prunable_slots(model):
        dense, sparse = _sparse_saving(linear, dtype)
        out["bytes_before"] += dense
        if semi and semi_structured(linear):
            out["semi_structured"] += 1
            out["bytes_after"] += _linear_bytes(linear)
        elif sparse < dense * (1.0 - min_saving):
            setattr(parent, short, SparseLinear.from_linear(linear, dtype=dtype))
            out["compressed"] += 1
            out["bytes_after"] += sparse
        else:
            out["kept_dense"] += 1
            out["bytes_after"] += dense
    log.info("compressed %d linears (%d semi-structured, %d kept dense): %d -> %d bytes", out["compressed"],
             out["semi_structured"], out["kept_dense"], out["bytes_before"], out["bytes_after"])
    return out


def decompress_linears(model: nn.Module | Loaded, dtype: torch.dtype | None = None) -> int:
    """Swap every SparseLinear back for a dense nn.Linear (zeros where pruned) in `dtype` (default: its values'), and
    every semi-structured 2:4 weight for its dense tensor; returns how many linears."""
    root = model.model if isinstance(model, Loaded) else model
    semi = [m for m in root.modules() if _is_semi_structured(getattr(m, "weight", None))]
    for module in semi:
        module.weight = nn.Parameter(module.weight.to_dense().to(dtype or module.weight.dtype), requires_grad=False)
    swapped = [(name, module) for name, module in root.named_modules() if isinstance(module, SparseLinear)]
    for name, sparse in swapped:
        parent, _, short = name.rpartition(".")
        dense = nn.Linear(sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
                          device=sparse.values.device, dtype=dtype or sparse.values.dtype)
        with torch.no_grad():
            dense.weight.copy_(sparse.to_dense())
            if sparse.bias is not None:
                dense.bias.copy_(sparse.bias)
        setattr(root.get_submodule(parent), short, dense.requires_grad_(False))
    return len(swapped) + len(semi)


def is_compressed(model: nn.Module | Loaded) -> bool:
    """Whether any linear of the model is held compressed (a SparseLinear, or a semi-structured 2:4 weight)."""
    root = model.model if isinstance(model, Loaded) else model
    return any(isinstance(m, SparseLinear) or _is_semi_structured(getattr(m, "weight", None))
               for m in root.modules())


def refuse_compressed(model: nn.Module | Loaded, action: str = "prune") -> None:
    """Raise ValueError where the model's linears are held compressed: their masks are baked into the layout, so
    pruning (or exporting) them again would silently skip them."""
    if is_compressed(model):
        raise ValueError(f"cannot {action} a model whose linears are held compressed (compress_linears); {action} the "
                         "dense model before compressing it, or call decompress_linears first")


def load_compressed(name_or_path, *, dtype: torch.dtype | str | None = None, device: str | None = None,
                    values_dtype: torch.dtype | None = None) -> Loaded:
    """`load_model` (a pruned export, dense or bitmask, or any model) with its pruned linears then held compressed
    (`compress_linears`, values in `values_dtype`, default the model's dtype). The dense weights exist once, while
    loading; pruning the result again is refused (`refuse_compressed`)."""
    loaded = load_model(name_or_path, dtype=dtype, device=device)
    compress_linears(loaded, dtype=values_dtype)
    return loaded
