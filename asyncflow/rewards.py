"""The reward-function contract: `fn(prompt: str, response: str, **row_fields) -> float`, and how it is called.

`check_reward` is the one place that decides what counts as a reward: a finite real number
(bools are refused — `True` is far more often a bug than a score).

`RewardCaller` calls the function the way the reward actor does: with a timeout, on daemon threads
of its own. Python cannot stop a thread, so a call that overruns the timeout keeps running (and
keeps its thread) until it returns by itself; such *hung* calls are bounded (`max_hung`): past the
bound a sample fails at once, without a call, until one of them returns. So a function that hangs
costs at most `max_hung` threads, never one per sample, and never blocks the event loop's default
executor, which the actor's Flight reads and writes need. Every failure — raised, timed out, not
called, not a number — is a `RewardFailure` whose message is the reason recorded for the sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import numbers
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncflow.errors import UserCodeError

DEFAULT_MAX_HUNG = 4
"""Reward calls that may still be running past their timeout at once (one thread each)."""


def check_reward(result: Any) -> float:
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        hint = " (async reward functions are not supported)" if asyncio.iscoroutine(result) else ""
        if asyncio.iscoroutine(result):
            result.close()  # never awaited: close it rather than leak a "never awaited" warning
        raise TypeError(f"returned {type(result).__name__} {_short(result)}, expected a number{hint}")
    try:
        value = float(result)
    except (OverflowError, ValueError, TypeError) as error:
        raise ValueError(f"returned {_short(result)}, which is not a float ({error})") from None
    if not math.isfinite(value):
        raise ValueError(f"returned non-finite {result!r}")
    return value


class RewardFailure(UserCodeError):
    """One sample's reward could not be computed; the message is the reason recorded for it."""


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    finished: bool = False
    timed_out: bool = False


class RewardCaller:
    """Calls `function` with a timeout on its own daemon threads, at most `max_hung` of them hung."""

    def __init__(self, function: Callable[..., Any], name: str, timeout_s: float,
                 max_hung: int = DEFAULT_MAX_HUNG) -> None:
        if max_hung < 1:
            raise ValueError(f"max_hung must be at least 1, got {max_hung}")
        self.function = function
        self.name = name
        self.timeout_s = timeout_s
        self.max_hung = max_hung
        self.hung = 0
        """Calls past their timeout that have not returned yet."""
        self.timeouts = 0
        self.not_called = 0
        self._jobs: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._busy = 0  # calls queued or running (hung ones included)

    @property
    def threads(self) -> int:
        """Worker threads started so far: at most max_hung + the calls made at once."""
        return len(self._threads)

    async def __call__(self, prompt: str, response: str, fields: dict[str, Any]) -> float:
        """The checked reward `function(prompt, response, **fields)` of one sample; raises
        RewardFailure with the reason otherwise. (`fields` is a dict, not **kwargs, so that a row
        field named like a parameter fails in the call, as that sample's failure.)"""
        loop = asyncio.get_running_loop()
        call = _Call((prompt, response), fields, loop, loop.create_future())
        with self._lock:
            if self.hung >= self.max_hung:
                self.not_called += 1
                raise RewardFailure(
                    f"reward function {self.name} not called: {self.hung} earlier calls are still running "
                    f"past the {self.timeout_s} s timeout (at most {self.max_hung} may hang at once)")
            self._busy += 1
            if self._busy > len(self._threads):  # no idle worker: start one (bounded by max_hung + callers)
                thread = threading.Thread(target=self._work, name=f"reward-call-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._jobs.put(call)
        try:
            result = await asyncio.wait_for(asyncio.shield(call.future), self.timeout_s)
        except TimeoutError:
            with self._lock:
                if not call.finished:
                    call.timed_out = True
                    self.hung += 1
                self.timeouts += 1
            raise RewardFailure(f"reward function {self.name} timed out after {self.timeout_s} s") from None
        except Exception as error:  # user code: anything can happen; the sample fails, the caller lives
            raise RewardFailure(f"reward function {self.name} raised {type(error).__name__}: {error}") from error
        try:
            return check_reward(result)
        except (TypeError, ValueError) as error:
            raise RewardFailure(f"reward function {self.name} {error}") from None

    def _work(self) -> None:
        while True:
            call = self._jobs.get()
            try:
                outcome, failed = self.function(*call.args, **call.kwargs), False
            except BaseException as error:  # even SystemExit from user code fails only its sample
                outcome, failed = error, True
            with self._lock:
                call.finished = True
                self._busy -= 1
                if call.timed_out:
                    self.hung -= 1
            if not call.timed_out:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    call.loop.call_soon_threadsafe(_settle, call.future, outcome, failed)


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.done():
        return
    if not failed:
        future.set_result(outcome)
    elif isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:  # SystemExit / KeyboardInterrupt raised by user code fail the sample, not the actor
        future.set_exception(UserCodeError(f"{type(outcome).__name__}: {outcome}"))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
