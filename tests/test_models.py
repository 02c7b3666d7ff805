"""Resolving --model: built-in name, GGUF path, transformers folder, and nonsense."""
from __future__ import annotations

import pytest

from lifelong.errors import BadInput
from lifelong.model.loading import resolve_model


def test_builtin_and_its_gguf_path_are_the_same_model():
    builtin = resolve_model("smollm2-135m")
    assert builtin.kind == "builtin-gguf" and builtin.path.endswith(".gguf")
    by_path = resolve_model(builtin.path)
    assert by_path.kind == "gguf" and by_path.sha256 == builtin.sha256


def test_transformers_folder(tiny_llama_dir):
    src = resolve_model(str(tiny_llama_dir))
    assert src.kind == "hf-dir" and len(src.sha256) == 64
    assert resolve_model(str(tiny_llama_dir)).sha256 == src.sha256


def test_unknown_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="neither a built-in model"):
        resolve_model(str(tmp_path / "nothing-here"))
