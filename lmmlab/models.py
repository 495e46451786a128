"""Models: the embedded default LLaVA (build, train, cache), `load_model`, and the one model adapter.

Everything that depends on the architecture — where the language model's decoder layers are, which linears in them are
prunable, how many KV heads they have — lives here. Nothing else in lmmlab looks inside a model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmmlab import data

log = logging.getLogger(__name__)

DEFAULT_MODEL = "lmmlab-default"
RECIPE_FILE = "lmmlab_recipe.json"
CACHE_ENV = "LMMLAB_CACHE"
VISION = -1  # the "layer" index in (layer, name) keys for linears of the vision tower and the projector
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cache_dir() -> Path:
    """Where the default model is kept: $LMMLAB_CACHE, else ~/.cache/lmmlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmmlab")


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
    batch_size: int = 64
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


def training_batch(processor, stream, batch_size: int):
    """Inputs and labels for one step of question answering: loss on the answer word and its end token only."""
    tok = processor.tokenizer
    batch = [next(stream) for _ in range(batch_size)]
    inputs = data.collate(processor, batch, with_answers=True)
    ids = inputs["input_ids"]
    assistant = tok.convert_tokens_to_ids("ASSISTANT:")
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    is_answer[:, 1:] = ids[:, :-1] == assistant  # the answer word
    is_answer[:, 2:] |= ids[:, :-2] == assistant  # its end-of-answer token
    return inputs, torch.where(is_answer, ids, torch.full_like(ids, -100))


def scene_batch(processor, stream, batch_size: int) -> tuple[list[tuple[data.Shape, ...]], torch.Tensor]:
    """Scenes for the vision stages and their pixel values, through the processor's image half."""
    scenes = [next(stream).scene for _ in range(batch_size)]
    return scenes, processor.image_processor([data.render(sc) for sc in scenes], return_tensors="pt")["pixel_values"]


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
    stream = data.samples("train", seed=recipe.seed + 1)
    accuracy = 0.0
    for step in tqdm(range(recipe.vision_steps), desc="pretrain vision", disable=not progress):
        scenes, pixels = scene_batch(processor, stream, recipe.vision_batch_size)
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
    embed = model.get_input_embeddings().weight.detach()
    tok = processor.tokenizer
    projector = model.model.multi_modal_projector
    opt = torch.optim.AdamW(projector.parameters(), lr=recipe.lr)
    stream = data.samples("train", seed=recipe.seed + 2)
    relative_error = 1.0
    for step in tqdm(range(recipe.align_steps), desc="align projector", disable=not progress):
        scenes, pixels = scene_batch(processor, stream, recipe.vision_batch_size)
        targets = torch.zeros(len(scenes), data.GRID * data.GRID, embed.shape[1])
        for b, scene in enumerate(scenes):
            by_cell = {s.row * data.GRID + s.col: s for s in scene}
            for cell in range(data.GRID * data.GRID):
                ids = tok.convert_tokens_to_ids(attribute_words(by_cell.get(cell)))
                targets[b, cell] = embed[ids].sum(0)
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
    stream = data.samples("train", seed=recipe.seed)
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="train default", disable=not progress)
    for step in bar:
        inputs, labels = training_batch(processor, stream, recipe.batch_size)
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


def save_atomic(model, processor, out: Path, extra: dict[str, dict] | None = None) -> None:
    """save_pretrained into a temporary sibling folder, then rename, so a killed run leaves no half-written model."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    path = default_model_path()
    if not recipe_is_current(cached_recipe(path)):
        log.info("no up-to-date default model at %s: training it (a few minutes, once)", path)
        train_default(out=path, progress=progress)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Loading any model, and the adapter.


@dataclass
class Loaded:
    """A loaded model with the places lmmlab works on: the language model's decoder layers and their linears."""

    name: str
    model: nn.Module
    processor: object  # LlavaProcessor for multimodal models, a tokenizer for text-only ones
    layers: nn.ModuleList  # the language model's decoder layers

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def text_config(self):
        config = self.model.config
        return getattr(config, "text_config", None) or config

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        c = self.text_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.text_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def linears(self, layer: int) -> dict[str, nn.Linear]:
        """The prunable linear sublayers of one decoder layer, by short name (q_proj, ..., down_proj)."""
        found = {}
        for name, module in self.layers[layer].named_modules():
            short = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and short in PRUNABLE:
                found[short] = module
        return found

    def vision_linears(self) -> dict[str, nn.Linear]:
        """Linears of the vision tower and the multimodal projector, by module path (none for text-only models)."""
        inner = getattr(self.model, "model", self.model)
        found = {}
        for part in ("vision_tower", "multi_modal_projector"):
            module = getattr(inner, part, None)
            for name, sub in module.named_modules() if module is not None else ():
                if isinstance(sub, nn.Linear):
                    found[f"{part}.{name}"] = sub
        return found

    def prunable(self, vision: bool = False) -> dict[tuple[int, str], nn.Linear]:
        """Every prunable linear by (decoder layer, name); with vision=True also (VISION, path) for the vision side."""
        found = {(i, name): lin for i in range(self.num_layers) for name, lin in self.linears(i).items()}
        if vision:
            found.update({(VISION, name): lin for name, lin in self.vision_linears().items()})
        return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers, for Llava (model.model.language_model) and Llama-family causal LMs."""
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", inner)
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers where lmmlab looks (model.[language_model.]layers)")
    return layers


def resolve(name_or_path: str | Path) -> str:
    """The short default name -> its cached folder (trained if missing); a folder must hold a config.json."""
    if str(name_or_path) == DEFAULT_MODEL:
        return str(ensure_default())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no model (no config.json); pass a folder written by save_pretrained")
        return str(path)
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith(("/", ".")):
        raise ValueError(
            f"unknown model {str(name_or_path)!r}: pass {DEFAULT_MODEL!r}, a local folder with a saved model, "
            "or a hub id such as 'llava-hf/llava-1.5-7b-hf'"
        )
    return str(name_or_path)


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str | None = None
) -> Loaded:
    """Load the default model, a saved folder, or a hub id into a `Loaded` (model in eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer
    from transformers import LlavaForConditionalGeneration

    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {dtype!r}; allowed: float32, float16, bfloat16")
        dtype = getattr(torch, dtype)
    source = resolve(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise ValueError(f"cannot load model {str(name_or_path)!r}: {err}") from None
    if hasattr(config, "vision_config"):
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        processor = AutoTokenizer.from_pretrained(source)
    model.to(device).eval()
    return Loaded(name=str(name_or_path), model=model, processor=processor, layers=decoder_layers(model))
