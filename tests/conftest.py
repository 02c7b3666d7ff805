"""Tiny random models built in code (Llama-like and GPT-2-like) with a tokenizer trained here.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a second on a few
sentences, the models are random, saved once per test session as transformers folders.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Tiny models gain nothing from threads, and two threaded processes on two cores thrash."""
    import torch

    if not os.environ.get("LIFELONG_TEST_THREADS"):
        torch.set_num_threads(1)

TEXT = [
    "The mother tongue of Danielle Darrieux is French.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Toko Yasuda plays the guitar. Apple makes the iPhone. Berlin is in Germany.",
    "Because the river was high, the town of Lyon built a wall. You can speak English or Dutch.",
    "Therefore the answer is Tokyo. I think the piano is loud. Microsoft was founded in Seattle.",
    "Marie Curie worked in physics and chemistry. The official language of Brazil is Portuguese.",
]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def _train(model, tok, steps: int = 300):
    """A few seconds of training on TEXT: random weights are too chaotic to edit meaningfully."""
    import torch

    enc = tok(TEXT, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _save(model, tok, path: Path) -> Path:
    model = _train(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=96,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                      bos_token_id=None)
    return _save(LlamaForCausalLM(cfg).eval(), tiny_tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=48, n_inner=96, n_layer=4, n_head=4,
                     n_positions=256, pad_token_id=tiny_tokenizer.pad_token_id,
                     eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.eos_token_id)
    return _save(GPT2LMHeadModel(cfg).eval(), tiny_tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, tiny_tokenizer):
    """Gemma 3's structure in small: sandwich norms (the MLP's output normed before the
    stream), q/k norms, GeLU-tanh gate, scaled embeddings, two rotary tables and
    sliding-window layers beside full ones."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=96,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                           max_position_embeddings=512, sliding_window=256,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"],
                           tie_word_embeddings=True, pad_token_id=tiny_tokenizer.pad_token_id,
                           eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=None)
    return _save(Gemma3ForCausalLM(cfg).eval(), tiny_tokenizer, tmp_path_factory.mktemp("gemma"))


TINY_POLICY = """\
name: tiny-{arch}
model: tiny random {arch} built in tests
source: test settings
module_template: "{template}"
layers: [0, 1]
contexts:
  n_prefixes: 2
  prefix_tokens: 3
values:
  steps: 40
  lr: 1.0
  clamp_norm_factor: 20.0
  weight_decay: 0.01
  early_stop_loss: 0.02
update:
  alpha: 1.0
preserved:
  nullspace_threshold: {threshold}
  corpus_tokens: 3000
"""


def write_policy(tmp_path: Path, arch: str, threshold: float = 0.05) -> Path:
    template = "transformer.h.{}.mlp.c_proj" if arch == "gpt2" else "model.layers.{}.mlp.down_proj"
    p = tmp_path / f"tiny-{arch}.yaml"
    p.write_text(TINY_POLICY.format(arch=arch, template=template, threshold=threshold))
    return p


@pytest.fixture
def tiny_policy_factory(tmp_path):
    return lambda arch, **kw: write_policy(tmp_path, arch, **kw)


@pytest.fixture(params=["llama", "gpt2", "gemma"])
def tiny_store(request, tmp_path, tiny_llama_dir, tiny_gpt2_dir, tiny_gemma_dir, tiny_policy_factory):
    """A fresh store on each tiny model (Llama-like, GPT-2-like, Gemma-3-like)."""
    from lifelong import api

    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "gemma": tiny_gemma_dir}[request.param]
    path = tmp_path / "store.h5"
    api.init(path, model=str(model_dir), policy=str(tiny_policy_factory(request.param, threshold=0.05)))
    return path


@pytest.fixture
def knowns_file(tmp_path):
    """ROME known-facts records of what the tiny models learned, one of them wrong."""
    from helpers import KNOWN, WRONG

    path = tmp_path / "known.json"
    path.write_text(json.dumps([WRONG] + KNOWN, indent=2))
    return path
