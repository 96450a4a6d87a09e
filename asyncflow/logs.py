"""structlog set-up: JSON lines to the run directory, short readable lines on the console.

Every process calls `setup_logging` once; loggers are then bound with run / actor / stage so a
line in `logs/<actor>.jsonl` always says who wrote it. `bind_process` sets those keys for the whole
process, so lines from shared code with its own logger (the NATS connection, the engines) carry
them too. Secrets never reach a log: values of keys that look like credentials are masked.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import structlog

_SECRET_NAMES = ("password", "passwd", "token", "secret", "credentials", "nkey", "api_key", "auth")


def _is_secret(key: str) -> bool:
    key = key.lower()
    return any(key == name or key.endswith("_" + name) for name in _SECRET_NAMES)


_PROCESS_CONTEXT: dict[str, Any] = {}
"""Keys every log line of this process carries unless the logger bound its own (`bind_process`)."""


def bind_process(**values: Any) -> None:
    """Give every log line of this process these keys (run, actor, stage, ...), from any thread or
    logger; a value a logger binds itself wins."""
    _PROCESS_CONTEXT.update(values)


def _add_process_context(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in _PROCESS_CONTEXT.items():
        event.setdefault(key, value)
    return event


def _mask_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if _is_secret(key):
            event[key] = "***"
    return event


class _Sink:
    """Final processor: one JSON line to the file, one short line to the console."""

    def __init__(self, json_file: TextIO | None, console: bool, console_level: int) -> None:
        self.json_file = json_file
        self.console = console
        self.console_level = console_level
        self.lock = threading.Lock()

    def __call__(self, _: Any, method: str, event: dict[str, Any]) -> str:
        level = event.get("level", method)
        with self.lock:
            if self.json_file is not None:
                self.json_file.write(json.dumps(event, default=str) + "\n")
                self.json_file.flush()
            if self.console and _LEVELS.get(level, 20) >= self.console_level:
                who = event.get("actor") or event.get("component") or ""
                role = str(who).rpartition("-")[0] or who  # `rollout-0` → `rollout`
                rest = " ".join(
                    f"{k}={v}" for k, v in event.items()
                    if k not in ("event", "level", "timestamp", "actor", "run", "component", "pid", "host")
                    and not (k in ("role", "stage") and v in (who, role))  # [who] says it already
                )
                stamp = time.strftime("%H:%M:%S")
                # sys.stderr looked up per line, not kept: a live progress display (asyncflow/progress.py)
                # swaps it for a proxy that prints above the display instead of through it.
                sys.stderr.write(f"{stamp} {level:<7} [{who}] {event.get('event', '')} {rest}\n".rstrip() + "\n")
                sys.stderr.flush()
        raise structlog.DropEvent


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50, "exception": 40}


def quiet_libraries() -> None:
    """Progress bars of transformers/hub would flood logs of processes that load models often."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers reads the variables above when it is imported; one imported already is told
    # directly. Importing it here only for that would cost every process ~1 s of CPU at start.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def setup_logging(json_path: Path | None = None, console: bool = True, console_level: str = "info") -> None:
    quiet_libraries()
    json_file = None
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_file = open(json_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.format_exc_info,
            _Sink(json_file, console, _LEVELS[console_level]),
        ],
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**bound)
