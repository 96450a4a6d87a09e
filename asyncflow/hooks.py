"""Loading user code by dotted path (`package.module:function`), with errors that say what failed."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from asyncflow.errors import UserCodeError


def load_callable(dotted: str, what: str) -> Callable[..., Any]:
    """Import `module:attr` and check it is callable; `what` names the hook in errors ("reward.function")."""
    if ":" not in dotted:
        raise UserCodeError(f"{what}: {dotted!r} must look like 'package.module:function'")
    module_name, attr = dotted.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may raise anything while importing
        raise UserCodeError(f"{what}: cannot import module {module_name!r}: {type(error).__name__}: {error}") from error
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise UserCodeError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise UserCodeError(f"{what}: {dotted!r} is a {type(target).__name__}, not a function")
    return target
