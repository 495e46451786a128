"""An lmms-eval model over a loaded lmmlab Llava model, registered with lmms-eval as "lmmlab".

lmms-eval (the harness LLaVA results are reported with) hands a "simple" model requests whose arguments are
  generate_until  (context, generation kwargs, doc_to_visual, doc_id, task, split)
  loglikelihood   (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)
and the model reads each document's images with `doc_to_visual(self.task_dict[task][split][doc_id])`.

The prompt is built as lmmlab's own benchmarks build it (`lmmlab.tasks.vqa.prompt_text`: the processor's chat
template, else LLaVA-1.5's "USER: <image>\\n{prompt} ASSISTANT:"), one image token per image. Answers come from the
same engine as lmmlab's tasks: `base.greedy_answers` (prefill all but the prompt's last token into a fresh cache from
`make_cache`, then every answer token from a decode step that reads it), over batches of requests of one exact token
length (`base.buckets`: nothing is padded, so no answer depends on its batch). Decoding is greedy; a request asking
for sampling or beams fails. Stop strings (`until`) cut the decoded text; `max_new_tokens` (or lm-eval's
`max_gen_toks`) bounds it, `DEFAULT_MAX_NEW_TOKENS` when a task names none (as lmms-eval's llava models).

`loglikelihood` returns the summed log-probability of the continuation's tokens after the prompt (the continuation
follows the prompt after one space, as lmmlab's answers do, unless it starts with whitespace itself) and whether
greedy decoding picks every one of them, the continuation read through the cache as `base.answer_nll` reads answers.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm import tqdm

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ModuleNotFoundError as err:  # the optional lmms-eval install is missing (named as a package, not a submodule)
    missing = (err.name or "lmms_eval").split(".")[0]
    raise ModuleNotFoundError(f"lmmlab's lmms-eval adapter needs lmms-eval (missing module {missing!r}): run `make lmms`",
                              name=missing) from None

from lmmlab.tasks.base import (CacheFactory, buckets, check_unpadded, greedy_answers, new_cache, prefill_then_read,
                               token_lengths)
from lmmlab.tasks.vqa import LLAVA_FORMAT

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava / llava_hf models, when a task's generation_kwargs name none
IMAGE = "<image>"


def chat_prompt(processor, text: str, n_images: int) -> str:
    """`text` after `n_images` image tokens in the model's conversation format, as `lmmlab.tasks.vqa.prompt_text`
    writes it for one image (the processor's chat template, else LLaVA-1.5's format)."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        conversation = [{"role": "user", "content": content}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return LLAVA_FORMAT.replace(f"{IMAGE}\n", f"{IMAGE}\n" * n_images).format(prompt=text)


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[tuple[str, ...], int]:
    """(stop strings, max new tokens) of a request's generation kwargs; anything but greedy decoding fails."""
    kwargs = dict(gen_kwargs or {})
    if kwargs.get("do_sample") and float(kwargs.get("temperature") or 0) > 0:
        raise ValueError(f"sampling is not supported (lmmlab decodes greedily); got generation kwargs {gen_kwargs}")
    if int(kwargs.get("num_beams") or 1) != 1:
        raise ValueError(f"beam search is not supported (lmmlab decodes greedily); got generation kwargs {gen_kwargs}")
    until = kwargs.get("until") or []
    until = (until,) if isinstance(until, str) else tuple(until)
    max_new = kwargs.get("max_new_tokens", kwargs.get("max_gen_toks", default_max_new_tokens))
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got generation kwargs {gen_kwargs}")
    return until, max_new


def cut(text: str, until: Sequence[str]) -> str:
    """`text` up to its first stop string, stripped."""
    stops = [text.index(s) for s in until if s and s in text]
    return (text[: min(stops)] if stops else text).strip()


@register_model("lmmlab")
class LmmlabLMMS(lmms):
    """A loaded lmmlab Llava model (`lmmlab.models.load_model`, pruned or not) for lmms-eval; every request decodes
    from a fresh cache from `make_cache` (a per-layer KV cache, e.g. `lmmlab.kv.cache.KVCacheFactory(plan, loaded)`;
    transformers' DynamicCache when None). `batch_size` bounds the requests of one forward pass."""

    def __init__(self, loaded, make_cache: CacheFactory | None = None, *, batch_size: int = 8,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        super().__init__()
        if not getattr(loaded, "is_multimodal", False):
            raise ValueError(f"lmms-eval tasks need a multimodal model; {getattr(loaded, 'name', loaded)!r} is not "
                             "(pass a Llava model)")
        for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.loaded, self.make_cache = loaded, make_cache
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    # --- requests -----------------------------------------------------------------------------------------------

    def _images(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        """The document's images as RGB PIL images (lmms-eval's doc_to_visual gives a list, or a list of lists)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        if not all(hasattr(v, "convert") for v in flat):
            kinds = sorted({type(v).__name__ for v in flat})
            raise ValueError(f"task {task!r} gives visuals of type {', '.join(kinds)}; lmmlab takes images only")
        return [v.convert("RGB") for v in flat]

    def _inputs(self, texts: list[str], images: list[list]) -> dict:
        """Processor inputs for prompts and their images, on the model's device, pixel values in its dtype."""
        flat = [image for row in images for image in row]
        inputs = self.loaded.processor(images=flat or None, text=texts, return_tensors="pt", padding=True,
                                       padding_side="left")
        inputs = dict(inputs.to(self.loaded.device))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.model.dtype)
        return inputs

    def _lengths(self, texts: list[str], images: list[list]) -> list:
        """A bucketing key per request: its exact token count when it has one image, else its own index."""
        single = [i for i, row in enumerate(images) if len(row) == 1]
        counted = token_lengths(self.loaded.processor, [texts[i] for i in single],
                                [images[i][0].size for i in single]) if single else []
        keys: list = [("alone", i) for i in range(len(texts))]
        for i, n in zip(single, counted):
            keys[i] = n
        return keys

    # --- lmms-eval's API ----------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Greedy answers of each request up to EOS, its stop strings or its max_new_tokens."""
        texts, images, settings = [], [], []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (req.args for req in requests):
            images.append(self._images(doc_to_visual, doc_id, task, split))
            texts.append(chat_prompt(self.loaded.processor, context, len(images[-1])))
            settings.append(generation_settings(gen_kwargs, self.max_new_tokens))
        keys = list(zip(self._lengths(texts, images), settings))
        results: list[str | None] = [None] * len(requests)
        for idx in tqdm(buckets(keys, self.batch_size), desc="lmms-eval generate_until", disable=self.rank != 0):
            until, max_new = settings[idx[0]]
            inputs = self._inputs([texts[i] for i in idx], [images[i] for i in idx])
            check_unpadded(inputs)
            answers, _ = greedy_answers(self.loaded, inputs, self.make_cache, max_new)
            for i, answer in zip(idx, answers):
                results[i] = cut(answer, until)
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]),
                                            results[i])
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation after the prompt, whether greedy decoding gives it)."""
        out = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
                [req.args for req in requests], desc="lmms-eval loglikelihood", disable=self.rank != 0):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            row = self._images(doc_to_visual, doc_id, task, split)
            out.append(self._score(chat_prompt(self.loaded.processor, context, len(row)), str(continuation), row))
        return out

    @torch.no_grad()
    def _score(self, prompt: str, continuation: str, images: list) -> tuple[float, bool]:
        full = prompt + ("" if continuation[:1].isspace() else " ") + continuation
        tok = self.loaded.tokenizer
        a, b = tok(prompt)["input_ids"], tok(full)["input_ids"]
        shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        n = len(b) - shared  # the continuation's tokens (the image expands alike in both texts)
        if n < 1:
            raise ValueError(f"lmms-eval sent a continuation with no token to score: {continuation!r}")
        inputs = self._inputs([full], [images])
        cache = new_cache(self.loaded, self.make_cache)
        logits = prefill_then_read(self.loaded.model, inputs, cache, tail=n + 1)[0][0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = inputs["input_ids"][0, -n:]
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
        return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("lmmlab's lmms-eval model answers single-round requests only")
