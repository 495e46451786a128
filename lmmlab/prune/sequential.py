"""The sequential recipe of SparseGPT's and Wanda's reference code: the decoder calibrated and pruned one layer at a
time, each layer seeing what the already-pruned layers before it produce (`layer_by_layer`)."""
from __future__ import annotations

import torch

from lmmlab.models import Loaded
from lmmlab.progress import bar


class _StopForward(Exception):
    pass


def decoder_inputs(loaded: Loaded, batches: list[dict]) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, token mask) that each batch brings to the first decoder layer (vision tower and merge done)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = loaded.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                loaded.model(**batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return [(args, kwargs, batch["attention_mask"].bool()) for (args, kwargs), batch in zip(captured, batches)]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_by_layer(loaded: Loaded, batches: list[dict], observe, prune, *, desc: str = "prune layer by layer",
                   progress: bool | None = None) -> None:
    """The sequential recipe of SparseGPT's and Wanda's reference code: calibrate and prune the decoder one layer at
    a time, each layer seeing what the already-pruned layers before it produce.

      for layer i:  run the calibration inputs through it, feeding every linear's input tokens (padding left out,
                    x [tokens, d_in]) to `observe(i)[name]`;  `prune(i)`;  run them again: the next layer's inputs.
    Linears that read the same tensor in a forward (q, k and v; gate and up) are fed the same token tensor object.
    `desc` names the progress bar (one step per layer; `progress` None: `lmmlab.progress`'s switch).
    """
    inputs = decoder_inputs(loaded, batches)
    for i, layer in bar(enumerate(loaded.layers), total=len(loaded.layers), desc=desc, unit="layer",
                            enabled=progress):
        mask: list[torch.Tensor] = []
        taken: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this forward's inputs, by identity

        def hook_for(fn):
            def hook(module, args):
                x = args[0]
                if id(x) not in taken or taken[id(x)][0] is not x:
                    taken[id(x)] = (x, x[mask[0]])
                fn(taken[id(x)][1])  # linears that read one tensor get one token tensor (`LayerHessians`)
            return hook

        linears = loaded.linears(i)
        handles = [linears[name].register_forward_pre_hook(hook_for(fn)) for name, fn in observe(i).items()]
        try:
            for args, kwargs, token_mask in inputs:
                mask[:] = [token_mask]
                taken.clear()
                layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        prune(i)
        inputs = [((_layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs, token_mask)
                  for args, kwargs, token_mask in inputs]
