"""Solved weights kept for re-use. A sequential solve (SparseGPT layer by layer, Wanda recalibrated layer by layer)
costs minutes on a small model and hours on a large one; a baseline solved while its hyperparameter is tuned on
validation is scored again on test. `SolveCache` keeps each solve compactly in host memory — per linear, its kept
values and its mask packed to bits — and puts it back bit for bit. The least recently used go first once the cache
holds more than `max_bytes`; a solve larger than that is not kept."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import numpy as np
import torch

from lmmlab.models import Loaded

MAX_BYTES = 4 << 30  # host memory the kept solves may take (SmolLM2-135M at 70 %: about 140 MB per solve)


class SolveCache:
    """Solved prunable weights by a key (the plan's weight part and calibration): `put` after a solve, `get` instead
    of the next one."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.kept: OrderedDict[Hashable, dict] = OrderedDict()  # key -> {linear: (values [kept], bits, shape)}

    @property
    def nbytes(self) -> int:
        return sum(entry_bytes(entry) for entry in self.kept.values())

    @torch.no_grad()
    def put(self, key: Hashable, loaded: Loaded) -> None:
        """Keep the prunable weights `loaded` holds now under `key`, dropping the least recently used past
        `max_bytes` (this one too when it alone is larger)."""
        entry = {}
        for name, linear in loaded.prunable(vision=True).items():
            W = linear.weight.detach().to("cpu")
            mask = W != 0
            entry[name] = (W[mask].clone(), np.packbits(mask.numpy().reshape(-1)), tuple(W.shape))
        self.kept[key] = entry
        self.kept.move_to_end(key)
        while self.kept and self.nbytes > self.max_bytes:
            self.kept.popitem(last=False)

    @torch.no_grad()
    def get(self, key: Hashable, loaded: Loaded) -> bool:
        """Put the solve kept under `key` into the model's prunable linears; False (nothing written) if none is."""
        entry = self.kept.get(key)
        if entry is None:
            return False
        self.kept.move_to_end(key)
        for name, linear in loaded.prunable(vision=True).items():
            values, bits, shape = entry[name]
            numel = int(np.prod(shape))
            mask = torch.from_numpy(np.unpackbits(bits, count=numel).astype(bool)).reshape(shape)
            W = torch.zeros(shape, dtype=values.dtype)
            W[mask] = values
            linear.weight.copy_(W)
        return True


def entry_bytes(entry: dict) -> int:
    return sum(values.numel() * values.element_size() + bits.nbytes for values, bits, _ in entry.values())
