"""The embedded default model: a real LlavaForConditionalGeneration trained by the project on the shapes task
(build, three-stage training recipe, cache). It is the one model defined by a task, so it reads the shapes data.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from lmmlab.models.adapter import DEFAULT_MODEL, save_atomic
from lmmlab.files import build_once, cache_dir
from lmmlab.tasks import shapes as data

log = logging.getLogger(__name__)

RECIPE_FILE = "lmmlab_recipe.json"


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_MODEL


# --------------------------------------------------------------------------------------------------------------------
# The default model: a real LlavaForConditionalGeneration, small enough to train on 2 CPU cores.


@dataclass(frozen=True)
class DefaultRecipe:
    """How the default model is built and trained (the numbers behind the README's accuracy)."""

    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 6
    text_heads: int = 6
    text_intermediate: int = 512
    vision_steps: int = 300  # stage 1a: per-patch shape/colour/size classification, vision tower only
    vision_batch_size: int = 128
    align_steps: int = 300  # stage 1b: projector maps each patch onto the sum of its attribute words' embeddings
    init_std: float = 0.06  # ~1/sqrt(hidden): GPT's 0.02 is for wide models and slows a 192-wide one down
    steps: int = 2000  # stage 2: projector + language model on question answering, vision tower frozen
    batch_size: int = 32  # 64 reached the same accuracy in twice the time
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def build_tokenizer():
    """A word-level tokenizer over the task's vocabulary, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + data.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE}, crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=data.CELL,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )


def build_default(recipe: DefaultRecipe = DefaultRecipe(), processor=None):
    """A randomly initialised default LLaVA (CLIP tower + Llama decoder) and its processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = processor or build_processor()
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden, intermediate_size=2 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
        image_size=data.IMAGE_SIZE, patch_size=data.CELL, projection_dim=recipe.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.text_hidden, intermediate_size=recipe.text_intermediate,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_heads, max_position_embeddings=256,
        initializer_range=recipe.init_std, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(data.IMAGE_SIZE // data.CELL) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


class QuickBatches:
    """The processor's batches of the shapes task for the toy's own training, made faster and bit for bit the same.

    The task's images are RGB at the processor's own size, so CLIP's pipeline (a same-size resize, a full crop,
    rescale, normalise) maps each byte of each channel to one float: a [3, 256] table read off the processor itself
    replaces it. The prompt's image token is expanded as the processor expands it, then tokenised. The first batch of
    each kind is checked against the processor, and on any difference the processor serves every batch."""

    def __init__(self, processor):
        self.processor = processor
        self.table = pixel_table(processor.image_processor)  # [3, 256] float32; None: the processor is not pointwise
        self.checked = {"pixels": False, "batch": False}

    def pixels(self, images) -> torch.Tensor:
        """[B, 3, H, W] pixel values of PIL images, as `processor.image_processor(images)` gives them."""
        slow = lambda: self.processor.image_processor(images, return_tensors="pt")["pixel_values"]  # noqa: E731
        if self.table is None:
            return slow()
        rgb = np.stack([np.asarray(im if im.mode == "RGB" else im.convert("RGB")) for im in images])  # [B, H, W, 3]
        fast = torch.from_numpy(np.stack([self.table[c][rgb[..., c]] for c in range(3)], 1))  # [B, 3, H, W]
        return self.checked_once("pixels", {"pixel_values": fast}, lambda: {"pixel_values": slow()})["pixel_values"]

    def collate(self, batch: Sequence[data.Sample], with_answers: bool = False) -> dict:
        """`data.collate(processor, batch, with_answers)`: input ids, attention mask, pixel values."""
        slow = lambda: dict(data.collate(self.processor, batch, with_answers))  # noqa: E731
        if self.table is None:
            return slow()
        pixels = self.pixels([s.image() for s in batch])
        expanded = self.processor.replace_image_token({"pixel_values": pixels}, 0)
        prompts = data.texts(self.processor, batch, with_answers)
        text = [t.replace(self.processor.image_token, expanded) for t in prompts]
        fast = {**self.processor.tokenizer(text, padding=True, return_tensors="pt"), "pixel_values": pixels}
        return self.checked_once("batch", fast, slow)

    def checked_once(self, kind: str, fast: dict, slow) -> dict:
        """`fast`, compared on the first call of a kind with the processor's `slow()`: if they differ, the table is
        given up and the processor's batch is returned."""
        if self.checked[kind]:
            return fast
        self.checked[kind] = True
        reference = slow()
        if fast.keys() == reference.keys() and all(torch.equal(fast[k], reference[k]) for k in fast):
            return fast
        log.warning("the quick batches differ from the processor's: using the processor")
        self.table = None
        return reference


def pixel_table(image_processor) -> np.ndarray | None:
    """[3, 256] the float the image processor gives each byte of each channel of an image at its own crop size, read
    off one probe image holding every byte; None if the processor's output is not pointwise in it."""
    h, w = image_processor.crop_size["height"], image_processor.crop_size["width"]
    if h * w < 256:  # the probe cannot hold every byte
        return None
    codes = np.stack([(np.arange(h * w) * k + c) % 256 for c, k in enumerate((1, 7, 11))], -1)  # [h*w, 3] every byte
    probe = Image.fromarray(codes.reshape(h, w, 3).astype(np.uint8), "RGB")
    out = image_processor([probe], return_tensors="np")["pixel_values"]
    if tuple(out.shape) != (1, 3, h, w):
        return None
    out = out[0].reshape(3, h * w)
    table = np.zeros((3, 256), dtype=out.dtype)
    for c in range(3):
        table[c, codes[:, c]] = out[c]
    pointwise = all(np.array_equal(table[c, codes[:, c]], out[c]) for c in range(3))
    return table if pointwise else None


def training_batch(quick: QuickBatches, stream, batch_size: int):
    """Inputs and labels for one step of question answering: loss on the answer word and its end token only."""
    tok = quick.processor.tokenizer
    batch = [next(stream) for _ in range(batch_size)]
    inputs = quick.collate(batch, with_answers=True)
    ids = inputs["input_ids"]
    assistant = tok.convert_tokens_to_ids("ASSISTANT:")
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    is_answer[:, 1:] = ids[:, :-1] == assistant  # the answer word
    is_answer[:, 2:] |= ids[:, :-2] == assistant  # its end-of-answer token
    return inputs, torch.where(is_answer, ids, torch.full_like(ids, -100))


def scene_batch(quick: QuickBatches, stream, batch_size: int) -> tuple[list[tuple[data.Shape, ...]], torch.Tensor]:
    """Scenes for the vision stages and their pixel values, as the processor's image half gives them."""
    scenes = [next(stream).scene for _ in range(batch_size)]
    return scenes, quick.pixels([data.render(sc) for sc in scenes])


def patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 9, D] the tower features LLaVA feeds its projector ("default" strategy: CLS dropped)."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def patch_labels(scene: tuple[data.Shape, ...]) -> torch.Tensor:
    """Per-cell targets (shape, colour, size; 0 = empty) in row-major patch order, for vision pretraining."""
    labels = torch.zeros(data.GRID * data.GRID, 3, dtype=torch.long)
    for s in scene:
        labels[s.row * data.GRID + s.col] = torch.tensor([
            1 + data.SHAPES.index(s.shape), 1 + list(data.COLOURS).index(s.colour), 1 + list(data.SIZES).index(s.size)
        ])
    return labels


def pretrain_vision(model, processor, recipe: DefaultRecipe, progress: bool = True) -> float:
    """Stage 1a: teach the CLIP tower what is in each patch, with linear heads on the features LLaVA reads.

    Through the language model alone the tower learns colour at once but shape identity only after a long plateau
    (a word must first be bound to an image token before the tower gets a useful gradient). A few hundred steps of
    direct per-patch supervision, standing in for CLIP pretraining, remove that plateau. Returns the final accuracy.
    """
    tower = model.model.vision_tower
    sizes = (1 + len(data.SHAPES), 1 + len(data.COLOURS), 1 + len(data.SIZES))
    heads = nn.ModuleList(nn.Linear(recipe.vision_hidden, n) for n in sizes)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    stream, quick = data.samples("train", seed=recipe.seed + 1), QuickBatches(processor)
    accuracy = 0.0
    for step in tqdm(range(recipe.vision_steps), desc="pretrain vision", disable=not progress):
        scenes, pixels = scene_batch(quick, stream, recipe.vision_batch_size)
        labels = torch.stack([patch_labels(sc) for sc in scenes])  # [B, 9, 3]
        features = patch_features(model, pixels)
        logits = [head(features) for head in heads]
        loss = sum(nn.functional.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten()) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        accuracy = torch.stack([lg.argmax(-1) == labels[..., i] for i, lg in enumerate(logits)]).all(0).float().mean().item()
    return accuracy


def attribute_words(shape: data.Shape | None) -> list[str]:
    """The words that describe one grid cell: its shape, colour, size and side(s) of the image, or 'nothing'."""
    if shape is None:
        return ["nothing"]
    words = [shape.shape, shape.colour, shape.size]
    words += {0: ["top"], 2: ["bottom"]}.get(shape.row, []) + {0: ["left"], 2: ["right"]}.get(shape.col, [])
    return words


def align_projector(model, processor, recipe: DefaultRecipe, progress: bool = True) -> float:
    """Stage 1b, LLaVA's "feature alignment" stage: train only the projector so that each image token lands on the
    sum of the word embeddings that describe its cell. The language model then finds "circle" in the image the way it
    finds a repeated word in text, which it learns far faster than matching arbitrary image features.
    Returns the final mean squared error relative to the targets' mean square.
    """
    embed = model.get_input_embeddings().weight.detach()  # not trained in this stage
    tok = processor.tokenizer
    projector = model.model.multi_modal_projector
    opt = torch.optim.AdamW(projector.parameters(), lr=recipe.lr)
    stream, quick = data.samples("train", seed=recipe.seed + 2), QuickBatches(processor)
    target_of: dict[tuple[str, ...], torch.Tensor] = {}  # a cell's words -> the sum of their embeddings
    relative_error = 1.0
    for step in tqdm(range(recipe.align_steps), desc="align projector", disable=not progress):
        scenes, pixels = scene_batch(quick, stream, recipe.vision_batch_size)
        targets = torch.zeros(len(scenes), data.GRID * data.GRID, embed.shape[1])
        for b, scene in enumerate(scenes):
            by_cell = {s.row * data.GRID + s.col: s for s in scene}
            for cell in range(data.GRID * data.GRID):
                words = tuple(attribute_words(by_cell.get(cell)))
                if words not in target_of:
                    target_of[words] = embed[tok.convert_tokens_to_ids(list(words))].sum(0)
                targets[b, cell] = target_of[words]
        with torch.no_grad():
            features = patch_features(model, pixels)
        loss = nn.functional.mse_loss(projector(features), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        relative_error = loss.item() / targets.pow(2).mean().item()
    return relative_error


def train_default(recipe: DefaultRecipe = DefaultRecipe(), out: Path | None = None, progress: bool = True) -> Path:
    """Train the default model from scratch and save it (model + processor) with `save_pretrained`; returns the path."""
    out = Path(out) if out else default_model_path()
    torch.manual_seed(recipe.seed)
    model, processor = build_default(recipe)
    model.train()
    if recipe.vision_steps:
        log.info("vision pretraining: per-patch accuracy %.3f", pretrain_vision(model, processor, recipe, progress))
    if recipe.align_steps:
        log.info("projector alignment: relative error %.3f", align_projector(model, processor, recipe, progress))
    # As in LLaVA, the vision tower stays frozen while the language side learns; fine-tuning it from here with a
    # fresh optimizer state scrambled the pretrained patch features and stalled training.
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stream, quick = data.samples("train", seed=recipe.seed), QuickBatches(processor)
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="train default", disable=not progress)
    for step in bar:
        inputs, labels = training_batch(quick, stream, recipe.batch_size)
        logits = model(**inputs).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    log.info("trained default model in %.0f s", seconds)
    model.eval()
    save_atomic(model, processor, out, extra={RECIPE_FILE: {**asdict(recipe), "task_version": data.TASK_VERSION,
                                                            "train_seconds": round(seconds, 1)}})
    return out


def cached_recipe(path: Path) -> dict | None:
    """The recipe a cached default model was trained with (None if there is no model there)."""
    file = Path(path) / RECIPE_FILE
    return json.loads(file.read_text()) if file.is_file() and (Path(path) / "config.json").is_file() else None


def recipe_is_current(recipe: dict | None) -> bool:
    """Whether a cached model's recipe is today's DefaultRecipe on today's task version."""
    current = {**asdict(DefaultRecipe()), "task_version": data.TASK_VERSION}
    return recipe is not None and all(recipe.get(k) == v for k, v in current.items())


def ensure_default(progress: bool = True) -> Path:
    """Path of the cached default model, training it first if the cache is empty or holds an older recipe."""

    def train(path: Path) -> None:
        log.info("no up-to-date default model at %s: training it (a few minutes, once)", path)
        train_default(out=path, progress=progress)

    return build_once(default_model_path(), is_current=lambda path: recipe_is_current(cached_recipe(path)), build=train)


