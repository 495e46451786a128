"""lm-evaluation-harness adapter: score a `Loaded` model (pruned in place or not) through any KV cache on lm-eval tasks.

`HarnessLM` is an `lm_eval.api.model.LM` (EleutherAI's lm-evaluation-harness, Gao et al., 2023) over a model already
in memory. Every request reads its context from the cache: the context, all but its last token, is prefilled into a
fresh cache from `make_cache`; the context's last token and the continuation then run against it as token-by-token
decoding reads it: in one pass until the cache's residual window (KIVI's `residual_length`) first fills, since nothing
is read back quantized before that, then one token per pass, since KIVI's value window slides by one token per
decoded token (a longer pass would let its later tokens read full-precision values that decoding reads quantized).
So each scored token sees exactly what it would see when decoded one token at a time — earlier tokens as the cache
stores them, quantized or not. Requests that share a context share one prefill; their continuations run as one
right-padded batch (causal attention keeps the padding out of every scored position, and quantization groups never
span batch rows; see `_score_group`).

Log-likelihoods and `is_greedy` follow lm-eval's HFLM: the sum of log-softmax over the continuation tokens, and
whether every one of them is the argmax. `loglikelihood_rolling` scores a text after `prefix_token_id` (BOS) in
lm-eval's disjoint rolling windows of `max_length` tokens. `generate_until` decodes greedily through the cache.

`evaluate_harness` runs `lm_eval.simple_evaluate` on task names, with extra task folders from `include_path`.
Needs the optional extra: pip install "lmmlab[harness]" (lm-eval).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

try:
    import lm_eval
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
except ModuleNotFoundError as err:  # the optional extra is missing
    raise ModuleNotFoundError(
        f"lmmlab.harness needs lm-eval (missing module {err.name!r}): pip install 'lmmlab[harness]'"
    ) from err

from lmmlab.tasks.base import CacheFactory, new_cache

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's HFLM


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class HarnessLM(TemplateLM):
    """An lm-eval `LM` over a `Loaded` model in memory; every request goes through a fresh cache from `make_cache`
    (transformers' DynamicCache when None). `batch_size` bounds the rows of one forward pass."""

    def __init__(self, loaded, *, make_cache: CacheFactory | None = None, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        _check_positive("batch_size", batch_size)
        _check_positive("max_gen_toks", max_gen_toks)
        self.loaded, self.make_cache = loaded, make_cache
        self.tokenizer = loaded.tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        config = loaded.text_config
        self._max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
        _check_positive("max_length", self._max_length)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    # --- what TemplateLM needs --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token a text with an empty context is conditioned on: BOS, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; the tokenizer's own special tokens (BOS) unless told, none if it already starts
        with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def get_model_info(self) -> dict:
        return {"model_name": self.loaded.name, "kv_cache": "dynamic" if self.make_cache is None else "factory"}

    # --- scoring ---------------------------------------------------------------------------------------------

    def _cache(self):
        return new_cache(self.loaded, self.make_cache)

    def _forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        return self.loaded.model(input_ids=ids.to(self.device), cache=cache, use_cache=True).logits

    def _read_through(self, tail: torch.Tensor, cache) -> torch.Tensor:
        """Logits [B, T, V] of `tail` [B, T] run against `cache` so that each position reads what token-by-token
        decoding would read: one pass up to the cache's first `residual_length` tokens (the first key flush; no
        value is quantized before it), then one token per pass (values slide out of the window token by token)."""
        window = getattr(cache, "residual_length", None)
        if not window:
            return self._forward(tail, cache)
        out, start = [], 0
        while start < tail.shape[1]:
            stop = min(tail.shape[1], start + max(1, window - cache.get_seq_length()))
            out.append(self._forward(tail[:, start:stop], cache))
            start = stop
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each continuation after one shared context, through one prefill."""
        cache = self._cache()
        if len(context) > 1:
            self._forward(torch.tensor([context[:-1]]), cache)
        if len(continuations) > 1:
            cache.batch_repeat_interleave(len(continuations))
        # Right padding is safe under a quantized cache, so it stays: rows never share a quantization group, and a
        # row's pads come after all of its scored positions. A key group that holds pads of row r is quantized when
        # the pass holding them ends (`_read_through`), after that pass's queries have read its keys in full
        # precision; only later positions read it back, and in row r those are all pads, never scored. Value groups
        # hold one token each. Pass ends fall at the same cache lengths whatever the widest row, so a continuation
        # scores the same alone or beside longer ones. (No byte count is kept here.)
        width = max(len(c) for c in continuations)
        tail = torch.full((len(continuations), width), self.pad_id, dtype=torch.long)
        for row, cont in enumerate(continuations):
            tail[row, : len(cont)] = torch.tensor(context[-1:] + cont[:-1])
        logits = self._read_through(tail, cache)
        scores = []
        for row, cont in enumerate(continuations):
            lp = torch.log_softmax(logits[row, : len(cont)].float(), dim=-1)  # one row at a time: [T, vocab] fp32
            target = torch.tensor(cont, device=lp.device)
            picked = lp.gather(-1, target[:, None]).squeeze(-1)
            scores.append((float(picked.sum()), bool((lp.argmax(-1) == target).all())))
        return scores

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so that context + continuation feed at most `max_length` tokens (as HFLM)."""
        if not continuation:
            raise ValueError("lm-eval sent an empty continuation to score; every continuation needs a token")
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
        keep = self.max_length + 1 - len(continuation)
        if len(context) > keep:
            log.warning("context of %d tokens truncated from the left to %d", len(context), keep)
            context = context[-keep:]
        return context, continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score (request, context ids, continuation ids) triples; requests sharing a context share a prefill."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        for i, (ctx, _) in enumerate(pairs):
            groups[tuple(ctx)].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = [(ctx, idx[s : s + self.batch_size]) for ctx, idx in groups.items()
                   for s in range(0, len(idx), self.batch_size)]
        for ctx, idx in tqdm(batches, desc="lm-eval loglikelihood", disable=disable_tqdm):
            for i, answer in zip(idx, self._score_group(list(ctx), [pairs[i][1] for i in idx])):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after `prefix_token_id`, in disjoint rolling windows (as HFLM)."""
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """(stop strings, max new tokens) from a request's generation kwargs; only greedy decoding is supported."""
        kwargs = dict(gen_kwargs)
        if kwargs.pop("do_sample", False) and kwargs.get("temperature", 0.0) > 0:
            raise ValueError(f"do_sample=True is not supported (lmmlab decodes greedily); got {gen_kwargs}")
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        _check_positive("max_gen_toks", max_gen)
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks {max_gen} must be below max_length {self.max_length}")
        return until, max_gen

    @staticmethod
    def _cut(text: str, until: Iterable[str]) -> tuple[str, bool]:
        """`text` up to the first stop string, and whether one was found."""
        cut = min((text.index(s) for s in until if s and s in text), default=None)
        return (text, False) if cut is None else (text[:cut], True)

    @torch.no_grad()
    def _generate_batch(self, contexts: list[list[int]], until: list[str], max_gen: int) -> list[str]:
        """Greedy continuations of equal-length contexts (no padding): prefill all but the last token, then every
        new token, the first included, is produced by a step that reads the cache."""
        cache = self._cache()
        ids = torch.tensor(contexts)
        if ids.shape[1] > 1:
            self._forward(ids[:, :-1], cache)
        step_input = ids[:, -1:]
        generated = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_gen):
            next_tokens = self._forward(step_input, cache)[:, -1].argmax(-1).cpu()
            for row, token in enumerate(next_tokens.tolist()):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                done[row] = self._cut(self.tokenizer.decode(generated[row], skip_special_tokens=True), until)[1]
            if all(done):
                break
            step_input = next_tokens[:, None]
        return [self._cut(self.tokenizer.decode(g, skip_special_tokens=True), until)[0] for g in generated]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context up to its first stop string (`until`), EOS or `max_gen_toks`."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            until, max_gen = self._generation_settings(gen_kwargs)
            tokens = self.tok_encode(context)[-(self.max_length - max_gen):]
            prepared.append(tokens)
            groups[(len(tokens), tuple(until), max_gen)].append(i)
        results: list[str | None] = [None] * len(requests)
        batches = [(key, idx[s : s + self.batch_size]) for key, idx in groups.items()
                   for s in range(0, len(idx), self.batch_size)]
        for (_, until, max_gen), idx in tqdm(batches, desc="lm-eval generate_until", disable=disable_tqdm):
            for i, text in zip(idx, self._generate_batch([prepared[i] for i in idx], list(until), max_gen)):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def evaluate_harness(loaded, tasks: list[str], *, make_cache: CacheFactory | None = None,
                     include_path: str | Path | list[str | Path] | None = None, include_defaults: bool = True,
                     limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                     seed: int = 0, bootstrap_iters: int = 1000, log_samples: bool = True) -> dict:
    """Run lm-eval's `simple_evaluate` on `tasks` with `loaded` behind `HarnessLM`; returns lm-eval's result dict
    (`results[task][metric]`, and per-document `samples` when `log_samples`). `include_path` adds task folders
    (or YAML files); `include_defaults=False` skips indexing lm-eval's own ~15k tasks (seconds)."""
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    for path in [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]:
        if not Path(path).exists():
            raise FileNotFoundError(f"include_path {path} does not exist")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; check the names or pass include_path to their YAML folder")
    lm = HarnessLM(loaded, make_cache=make_cache, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    log.info("lm-eval %s: %s", ", ".join(tasks), {t: r for t, r in results["results"].items()})
    return results
