"""Small, real HF models built locally (no hub access) for tests and examples.

A character-level tokenizer (one token per character) and a randomly initialised Llama that
`transformers`, the HF engines and vLLM all load like any other HF folder. The ids are fixed:

    0 "<pad>", 1 "<bos>", 2 "<eos>", 3 "<unk>", then the characters in first-seen order.

`<unk>` is there so that text with a character outside the alphabet (a model's odd output fed
back through a reward function, say) encodes instead of raising. Encoding adds no BOS/EOS: the
ids are exactly one per character, and callers that want a BOS prepend `bos_token_id` themselves.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from asyncflow.errors import ConfigError

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

DEFAULT_CHARS = "0123456789+-*= "
"""Alphabet of the default tiny model: enough for small arithmetic prompts like "3+4="."""


def _alphabet(chars: str) -> list[str]:
    # Order of first appearance, duplicates dropped, so the same string always gives the same ids.
    seen: dict[str, None] = dict.fromkeys(chars)
    return list(seen)


def build_char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over `chars`; see the module docstring for the id layout."""
    alphabet = _alphabet(chars)
    if not alphabet:
        raise ConfigError("build_char_tokenizer: `chars` is empty; give the characters the model should know")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character, newline included, is its own pre-token ("." would skip newlines).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates tokens; the default decoder would join them with spaces.
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(
    path: Path,
    chars: str,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 128,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a randomly initialised `LlamaForCausalLM` and its char tokenizer to `path`
    (`tie_word_embeddings`: one matrix for input and output embeddings, as SmolLM2 has).

    Idempotent: if `path/config.json` exists the folder is returned untouched. The folder is
    written under a temporary name and renamed into place, so concurrent callers (rollout and
    trainer starting together) never see half a model.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    tokenizer = build_char_tokenizer(chars)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(staging)  # safetensors is the default format
        tokenizer.save_pretrained(staging)
        try:
            # Replaces `path` only if it is absent or an empty directory.
            os.replace(staging, path)
        except OSError:
            if (path / "config.json").exists():
                return path  # another process finished first; its model is as good as ours
            raise ConfigError(
                f"cannot create the tiny model at {path}: it exists, is not empty and holds no config.json; "
                "remove it or choose another model path"
            ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def build_default_tiny_llama(path: Path, seed: int = 0) -> Path:
    """The default tiny model over `DEFAULT_CHARS`; matches the `model.create_with` hook signature."""
    return build_tiny_llama(path, DEFAULT_CHARS, seed=seed)
