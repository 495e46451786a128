"""Calibration: input statistics of every prunable linear, from one pass over calibration samples.

For each linear y = W x of the language model's decoder layers we accumulate, over all non-padding tokens,
  sq_norm[j] = Σ_t x_tj²          (Wanda's and RIA's ‖X_j‖₂ is its square root)
and, only when asked, the Gram matrix XᵀX (d_in × d_in) that SparseGPT's Hessian H = 2XᵀX is made of.
Statistics are stored per (layer index, linear name) in float32 on the CPU, so the model itself is untouched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lmmlab.models import VISION, Loaded

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (decoder layer index, linear name such as "q_proj")


@dataclass
class Stats:
    """Per-linear input statistics from calibration."""

    sq_norm: dict[Key, torch.Tensor] = field(default_factory=dict)  # [d_in], Σ_t x_tj²
    gram: dict[Key, torch.Tensor] = field(default_factory=dict)  # [d_in, d_in], XᵀX (only with gram=True)
    tokens: int = 0  # non-padding tokens seen

    def norm(self, key: Key) -> torch.Tensor:
        """‖X_j‖₂ for every input feature j of one linear."""
        return self.sq_norm[key].sqrt()


@torch.no_grad()
def calibrate(loaded: Loaded, batches: Iterable[dict], gram: bool | Sequence[int] = False,
              vision: bool = False, progress: bool = False) -> Stats:
    """Run `batches` (model inputs with an attention_mask) through the model once and collect Stats.

    Any inputs the model accepts work: a task's `calibration_batches` (image + question, or text windows).
    `gram`: True for XᵀX of every linear, or a list of layer indices (on a 7B model all of them take ~20 GB;
    SparseGPT does not need them: it builds its Hessians one layer at a time).
    `vision`: also the vision tower's and projector's linears (keys (VISION, module path); every image token counts).
    """
    gram_layers = set(range(loaded.num_layers)) if gram is True else set(gram or ())
    stats = Stats()
    current_mask: list[torch.Tensor] = []  # the running batch's attention mask, read by the hooks

    def hook_for(key: Key):
        def hook(module, args):
            x = args[0].detach()
            text_tokens = key[0] != VISION and x.dim() == 3
            x = x[current_mask[0].bool()] if text_tokens else x.reshape(-1, x.shape[-1])  # [tokens, d_in]
            x = x.float()
            if key in stats.sq_norm:
                stats.sq_norm[key] += x.pow(2).sum(0).cpu()
            else:
                stats.sq_norm[key] = x.pow(2).sum(0).cpu()
            if key[0] in gram_layers:
                xtx = (x.T @ x).cpu()
                stats.gram[key] = stats.gram[key] + xtx if key in stats.gram else xtx
        return hook

    handles = [linear.register_forward_pre_hook(hook_for(key)) for key, linear in loaded.prunable(vision).items()]
    try:
        for batch in tqdm(list(batches), desc="calibrate", disable=not progress):
            if "attention_mask" not in batch:
                raise ValueError("calibration batches need an attention_mask (padding tokens are left out)")
            current_mask[:] = [batch["attention_mask"]]
            stats.tokens += int(batch["attention_mask"].sum())
            loaded.model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if stats.tokens == 0:
        raise ValueError("calibration saw no tokens: pass at least one non-empty batch")
    log.info("calibrated %d linears on %d tokens", len(stats.sq_norm), stats.tokens)
    return stats
