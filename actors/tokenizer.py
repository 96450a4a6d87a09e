"""The model's tokenizer for the actors that only tokenize prompts or decode responses, without
importing torch and transformers' AutoTokenizer machinery when the same result can be had without.

`from transformers import AutoTokenizer` imports torch and most of transformers (~4-5 s of CPU on a
small machine), at the moment the rollout and trainer engines, the critical path of a run's start,
load on the same cores. For the common model folder (a `tokenizer.json` saved from transformers'
generic tokenizers-backed class) AutoTokenizer builds exactly `PreTrainedTokenizerFast` (v5:
`TokenizersBackend`, the same class) from it, which needs neither. `load_tokenizer` builds that
class directly where AutoTokenizer would pick it, and falls back to AutoTokenizer wherever it might
pick another; `response_decoder` decodes with the `tokenizers` package alone where that is provably
what the transformers tokenizer's `decode` does.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
"""`tokenizer_class` values of transformers' generic tokenizers-backed class (aliases in v5)."""
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@functools.cache
def _models_with_incorrect_hub_class() -> frozenset[str] | None:
    """transformers' `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`: model types for which AutoTokenizer
    ignores a folder's `tokenizer_class` and uses the class registered for the model type. Read from
    the source, not imported (importing that module imports torch); None where it cannot be found
    (another transformers version: then AutoTokenizer is used for every folder)."""
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0]) / "models" / "auto" / "tokenization_auto.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS":
            try:
                value = ast.literal_eval(node.value) if node.value is not None else None
            except ValueError:
                return None
            return frozenset(value) if isinstance(value, set) else None
    return None


def generic_tokenizer_config(model_path: Path) -> dict[str, Any] | None:
    """The folder's tokenizer_config.json when `AutoTokenizer.from_pretrained(model_path)` builds the
    generic class from its tokenizer.json, else None (it may build something else, or cannot tell).

    That is AutoTokenizer's choice (transformers 5) when the config names the generic class and
    nothing overrides it: no remote code (`auto_map`), no Mistral tekken tokenizer, and a model type
    whose Hub class transformers trusts."""
    model_path = Path(model_path)
    if not (model_path / "tokenizer.json").is_file() or (model_path / "tekken.json").exists():
        return None
    tokenizer_config = _read_json(model_path / "tokenizer_config.json")
    model_config = _read_json(model_path / "config.json")
    if tokenizer_config is None or model_config is None:
        return None
    if tokenizer_config.get("tokenizer_class") not in GENERIC_CLASSES or "auto_map" in tokenizer_config:
        return None
    if "auto_map" in model_config:
        return None
    overridden = _models_with_incorrect_hub_class()
    if overridden is None or {model_config.get("model_type"), model_config.get("model_name")} & overridden:
        return None
    return tokenizer_config


def load_tokenizer(model_path: Path) -> Any:
    """What `AutoTokenizer.from_pretrained(model_path)` returns, built without importing torch where
    the folder allows it (see `generic_tokenizer_config`)."""
    if generic_tokenizer_config(model_path) is not None:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def _special_contents(value: Any) -> list[str]:
    """Token texts of a special-token entry of tokenizer_config.json: a string, an AddedToken dict,
    or a list / dict of those."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if "content" in value:
            return [str(value["content"])]
        return [text for item in value.values() for text in _special_contents(item)]
    if isinstance(value, list):
        return [text for item in value for text in _special_contents(item)]
    return []


def _backend_decodes_alone(tokenizer_config: dict[str, Any], backend: Any) -> bool:
    """Whether transformers' `decode(ids, skip_special_tokens=True)` of the generic class built from
    this folder is `backend.decode(ids, skip_special_tokens=True)`: it is, but for the clean-up of
    tokenization spaces (off by default) and for special tokens the config names that the
    tokenizer.json lacks or does not mark special (transformers adds or re-marks them at load,
    which changes what is skipped)."""
    if tokenizer_config.get("clean_up_tokenization_spaces", False):
        return False
    by_id = backend.get_added_tokens_decoder()
    added = {token.content: token.special for token in by_id.values()}
    for index, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        token = by_id.get(int(index))
        if token is None or not isinstance(entry, dict) or token.content != entry.get("content") \
                or token.special != bool(entry.get("special", False)):
            return False
    named = [text for key in NAMED_SPECIAL_TOKENS for text in _special_contents(tokenizer_config.get(key))]
    named += _special_contents(tokenizer_config.get("additional_special_tokens"))
    named += _special_contents(tokenizer_config.get("extra_special_tokens"))
    return all(added.get(text) is True for text in named)


def response_decoder(model_path: Path) -> Callable[[Sequence[int]], str]:
    """`ids → text` as `AutoTokenizer.from_pretrained(model_path).decode(ids, skip_special_tokens=True)`,
    with the `tokenizers` package alone where that decodes identically (no transformers import)."""
    model_path = Path(model_path)
    tokenizer_config = generic_tokenizer_config(model_path)
    if tokenizer_config is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        if _backend_decodes_alone(tokenizer_config, backend):
            return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    tokenizer = load_tokenizer(model_path)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
