"""`asyncflow status --nats URL --run NAME`: how a live run is doing, read from its broker alone.

Everything comes from what the run already keeps on NATS, so it works from any machine that
reaches the broker, for a run started anywhere:

- actors: their `actors.<id>` heartbeats in the run's KV bucket (role, host, pid, state, policy
  version, heartbeat age) and, where they answer, their `asyncflow-<role>` micro services'
  `stats` (items done / failed, busy seconds, and the live state and policy version, which a
  heartbeat may show a period late);
- queue depth per stage: the durable consumers on the WORK stream (queued, in progress, redelivered,
  waiting pull requests = idle instances);
- step, reward and samples/s: the trainer's StepEvents on the EVENTS stream (`af.<run>.done.trainer`),
  timed by JetStream's own message timestamps; dead letters per stage from the stream's subject counts
  plus those compaction purged (KV `events_compaction`).

`collect_status` returns a JSON-ready dict (what `--json` prints); `format_status` renders it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from actors.micro import SERVICE_PREFIX
from asyncflow.config import SecuritySettings
from asyncflow.errors import BrokerError, WireError
from asyncflow.security import nats_connect_options
from asyncflow.security import redact_url as redact_one_url
from asyncflow.wire import Heartbeat, decode
from broker import RunNames
from broker.names import KV_CONFIG, KV_EVENTS_COMPACTION, KV_POLICY_VERSION, KV_PROGRESS

ACTOR_KEY_PREFIX = "actors."


def redact_url(url: str) -> str:
    """`nats://user:secret@host:4222` → `nats://***@host:4222`, for each URL of a comma-separated
    server list: credentials never reach output."""
    return ",".join(redact_one_url(part.strip()) for part in url.split(","))


# -- shared by status and inspect -----------------------------------------------------------------

async def connect_once(nats_url: str, name: str, timeout_s: float, security: SecuritySettings | None = None) -> NATS:
    """One connection attempt, failing fast: a command must not wait forever for a broker that is
    not there, as an actor (broker.connect) rightly does. `security` adds token / password / TLS."""
    errors: list[Exception] = []

    async def keep(error: Exception) -> None:  # nats-py would log each attempt; the raise says it once
        errors.append(error)

    try:
        # max_reconnect_attempts=1: nats-py's server selection only gives up on a server with a
        # positive limit (0 retries forever, even with allow_reconnect off); two tries, then it raises.
        return await nats.connect(nats_url, name=name, connect_timeout=timeout_s, allow_reconnect=False,
                                  max_reconnect_attempts=1, reconnect_time_wait=0.2, error_cb=keep,
                                  **nats_connect_options(security))
    except Exception as error:  # nats raises several unrelated types on connect failures
        cause = errors[-1] if errors else error
        raise BrokerError(f"cannot connect to NATS at {redact_url(nats_url)}: {type(cause).__name__}: {cause}") from None


async def open_run(nats_url: str, run: str, timeout_s: float, client_name: str,
                   security: SecuritySettings | None = None) -> tuple[NATS, JetStreamContext, KeyValue]:
    """Connect and find the run's KV bucket; a run that is not there is an error naming what exists."""
    try:
        names = RunNames(run)
    except ValueError as error:
        raise BrokerError(str(error)) from None
    nc = await connect_once(nats_url, client_name, timeout_s, security)
    try:
        js = nc.jetstream(timeout=timeout_s)
        try:
            kv = await js.key_value(names.kv_bucket)
        except (BucketNotFoundError, NotFoundError):
            known = await _run_buckets(js)
            raise BrokerError(
                f"run {run!r} not found at {redact_url(nats_url)}: no KV bucket {names.kv_bucket} "
                f"(run buckets there: {', '.join(known) or 'none'})"
            ) from None
    except BaseException:
        await nc.close()
        raise
    return nc, js, kv


async def _run_buckets(js: JetStreamContext) -> list[str]:
    with contextlib.suppress(Exception):
        streams = await js.streams_info()
        return sorted(s.config.name[3:] for s in streams if s.config.name.startswith("KV_AF_"))
    return []


async def gather_replies(nc: NATS, subject: str, timeout_s: float,
                         enough: Callable[[list[dict[str, Any]]], bool] = lambda _: False) -> list[dict[str, Any]]:
    """Publish one request on `subject` and collect every JSON reply (a request to `$SRV.STATS`
    is answered by each service) until `enough(replies)` or `timeout_s` has passed."""
    replies: list[dict[str, Any]] = []
    complete = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            replies.append(json.loads(msg.data))
        if enough(replies):
            complete.set()

    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush(timeout=timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(complete.wait(), timeout_s)
    finally:
        await subscription.unsubscribe()
    return replies


async def kv_json(kv: KeyValue, key: str) -> Any:
    """A KV value parsed as JSON; None when the key is absent or not JSON."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return None
    try:
        return json.loads(entry.value or b"null")
    except ValueError:
        return None


async def kv_keys(kv: KeyValue) -> list[str]:
    try:
        return sorted(await kv.keys())
    except NoKeysError:
        return []


async def read_subject(js: JetStreamContext, stream: str, subject: str, *, since: datetime | None,
                       limit: int, timeout_s: float) -> list[Any]:
    """The first `limit` messages of `subject` in `stream` stored at or after `since` (from the start
    when None), oldest first. Reads with a short-lived consumer (no acks) that is deleted after."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL, opt_start_time=since,
        ack_policy=AckPolicy.NONE, inactive_threshold=max(10.0, 3 * timeout_s), mem_storage=True,
        description="asyncflow status: read-only, deleted after use",
    )
    try:
        subscription = await js.pull_subscribe(subject, stream=stream, config=config)
    except Exception as error:
        raise BrokerError(f"cannot read {subject} from stream {stream}: {error!r}") from None
    messages: list[Any] = []
    consumer = None
    try:
        info = await subscription.consumer_info()
        consumer = info.name
        wanted = min(info.num_pending, limit)
        while len(messages) < wanted:
            try:
                messages += await subscription.fetch(min(wanted - len(messages), 256), timeout=timeout_s)
            except TimeoutError:
                break  # the stream shrank meanwhile (limits); what we have is what there is
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        if consumer is not None:  # else inactive_threshold removes it
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, consumer)
    return messages


# -- status ---------------------------------------------------------------------------------------

async def collect_status(nats_url: str, run: str, *, window_s: float = 60.0, timeout_s: float = 10.0,
                         discover_s: float = 1.0, security: SecuritySettings | None = None) -> dict[str, Any]:
    """The run's state as a JSON-ready dict (see the module docstring for where each part comes from)."""
    names = RunNames(run)
    nc, js, kv = await open_run(nats_url, run, timeout_s, "asyncflow-status", security)
    try:
        now = time.time()
        config = await kv_json(kv, KV_CONFIG) or {}
        broker = config.get("broker", {})
        stale_after = broker.get("heartbeat_timeout_s") or 3 * broker.get("heartbeat_s", 2.0)
        actors, problems = await _heartbeats(kv, now, stale_after)
        expected = {a["actor"] for a in actors if a["alive"] and a["state"] != "stopping"}
        services = await _service_stats(nc, run, expected, discover_s)
        for actor in actors:
            actor.update(services.pop(actor["actor"], {"service": False}))
        for actor_id, stats in services.items():  # answering but without a heartbeat (yet)
            actors.append({"actor": actor_id, "role": stats.get("role"), "host": stats.get("host"),
                           "pid": stats.get("pid"), "state": stats.get("state"),
                           "policy_version": stats.get("policy_version"), "heartbeat_age_s": None,
                           "alive": True, **stats})
        actors.sort(key=lambda a: (str(a["role"]), str(a["actor"])))
        status: dict[str, Any] = {
            "run": run, "nats": redact_url(nats_url), "time": round(now, 3),
            "steps_total": config.get("run", {}).get("steps"),
            "policy_version": await kv_json(kv, KV_POLICY_VERSION),
            "progress": await kv_json(kv, KV_PROGRESS),
            "actors": actors,
            "queues": await _queues(js, names),
            "dead_letters": await _dead_letters(js, names, await kv_json(kv, KV_EVENTS_COMPACTION)),
            "problems": problems,
        }
        status.update(await _training(js, names, now, window_s, timeout_s))
        return status
    finally:
        await nc.close()


async def _heartbeats(kv: KeyValue, now: float, stale_after: float) -> tuple[list[dict[str, Any]], list[str]]:
    actors, problems = [], []
    for key in await kv_keys(kv):
        if not key.startswith(ACTOR_KEY_PREFIX):
            continue
        try:
            entry = await kv.get(key)
            beat = decode(Heartbeat, entry.value or b"", f"KV {key}")
        except (KeyNotFoundError, NotFoundError):
            continue  # deleted between listing and reading
        except WireError as error:
            problems.append(str(error))
            continue
        age = now - beat.time
        actors.append({
            "actor": beat.actor, "role": beat.role, "host": beat.host, "pid": beat.pid, "state": beat.state,
            "policy_version": beat.policy_version, "heartbeat_age_s": round(age, 3), "alive": age <= stale_after,
        })
    return actors, problems


async def _service_stats(nc: NATS, run: str, expected: set[str], discover_s: float) -> dict[str, dict[str, Any]]:
    """actor → its micro service's stats (from `$SRV.STATS`), for this run's services that answer."""
    def ours(reply: dict[str, Any]) -> bool:
        return str(reply.get("name", "")).startswith(SERVICE_PREFIX) and reply.get("metadata", {}).get("run") == run

    def enough(replies: list[dict[str, Any]]) -> bool:
        return bool(expected) and expected <= {r["metadata"].get("actor") for r in replies if ours(r)}

    out: dict[str, dict[str, Any]] = {}
    for reply in await gather_replies(nc, "$SRV.STATS", discover_s, enough):
        if not ours(reply):
            continue
        data = next((e.get("data") for e in reply.get("endpoints", []) if e.get("name") == "stats"), None) or {}
        out[reply["metadata"].get("actor", reply.get("id"))] = {
            "service": True, "service_id": reply.get("id"),
            # state and policy version too: live, where the heartbeat's may be a period old.
            **{k: data.get(k) for k in ("state", "policy_version", "items_done", "samples_done", "items_failed",
                                        "dead_lettered", "in_flight", "busy_s", "uptime_s", "error")},
        }
    return out


async def _queues(js: JetStreamContext, names: RunNames) -> dict[str, dict[str, Any]]:
    try:
        consumers = await js.consumers_info(names.work_stream)
    except NotFoundError:
        return {}
    queues = {}
    for info in consumers:
        if not info.config.durable_name:
            continue  # somebody's ephemeral reader, not a stage's queue
        queues[info.name] = {
            "queued": info.num_pending, "in_progress": info.num_ack_pending,
            "redelivered": info.num_redelivered, "waiting_pulls": info.num_waiting,
            "delivered": info.delivered.stream_seq if info.delivered else None,
        }
    return dict(sorted(queues.items()))


async def _dead_letters(js: JetStreamContext, names: RunNames, compaction: Any) -> dict[str, int]:
    """Dead letters per stage: those in the EVENTS stream (the newest DEAD_LETTERS_KEPT at least)
    plus those compaction purged, which the scheduler counts in KV `events_compaction`."""
    counts: Counter[str] = Counter()
    purged = compaction.get("dead_letters_purged") if isinstance(compaction, dict) else None
    if isinstance(purged, dict):
        counts.update({str(stage): n for stage, n in purged.items() if isinstance(n, int)})
    try:
        info = await js.stream_info(names.events_stream, subjects_filter=f"{names.prefix}.dead.>")
    except NotFoundError:
        return dict(sorted(counts.items()))
    counts.update({subject.rsplit(".", 1)[-1]: n for subject, n in (info.state.subjects or {}).items()})
    return dict(sorted(counts.items()))


async def _training(js: JetStreamContext, names: RunNames, now: float, window_s: float,
                    timeout_s: float) -> dict[str, Any]:
    """Last step, reward and samples/s from the trainer's StepEvents."""
    subject = names.done("trainer")
    try:
        last: RawStreamMsg = await js.get_last_msg(names.events_stream, subject)
    except NotFoundError:
        return {"steps_done": 0, "last_step": None, "samples_per_s": None, "rate_window_s": None,
                "reward_mean_window": None}
    event = json.loads(last.data or b"{}")
    last_time = last.time.timestamp() if last.time else now
    # The window is measured back from the last step, not from now: a run between steps keeps its rate.
    since = datetime.fromtimestamp(last_time, UTC) - timedelta(seconds=window_s)
    recent = await read_subject(js, names.events_stream, subject, since=since, limit=10_000, timeout_s=timeout_s)
    if len(recent) < 2:  # slower than one step per window: take the whole run
        recent = await read_subject(js, names.events_stream, subject, since=None, limit=10_000, timeout_s=timeout_s)
    steps = [(m.metadata.timestamp.timestamp(), json.loads(m.data)) for m in recent]
    rate = span = None
    if len(steps) >= 2:
        span = steps[-1][0] - steps[0][0]
        trained = sum(len(e.get("sample_ids", [])) for _, e in steps[1:])  # samples finished inside the span
        rate = round(trained / span, 3) if span > 0 else None
    rewards = [e["reward_mean"] for _, e in steps if e.get("reward_mean") is not None]
    return {
        "steps_done": int(event.get("step", -1)) + 1,
        "last_step": {
            "step": event.get("step"), "policy_version": event.get("policy_version"),
            "reward_mean": event.get("reward_mean"), "loss": event.get("loss"),
            "samples": len(event.get("sample_ids", [])), "failed_samples": event.get("failed_samples"),
            "final": event.get("final", False), "age_s": round(now - last_time, 3),
        },
        "samples_per_s": rate,
        "rate_window_s": None if span is None else round(span, 3),
        "reward_mean_window": round(sum(rewards) / len(rewards), 6) if rewards else None,
    }


# -- text -----------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _num(value: Any, digits: int = 3, unit: str = "") -> str | None:
    return None if value is None else f"{value:.{digits}f}{unit}"


def format_status(status: dict[str, Any]) -> str:
    last = status["last_step"] or {}
    total = status["steps_total"] or "?"
    head = [f"run {status['run']} at {status['nats']}"]
    if last:
        reward = _num(last.get("reward_mean")) or "n/a"
        rate = (f"{status['samples_per_s']} samples/s over the last {status['rate_window_s']:.1f} s"
                if status["samples_per_s"] is not None else "samples/s n/a (fewer than 2 steps)")
        head.append(f"step {status['steps_done']}/{total} done{' (final)' if last.get('final') else ''}  "
                    f"policy v{status['policy_version']}  reward {reward} (last step; "
                    f"{_num(status['reward_mean_window']) or 'n/a'} recent mean)  {rate}  "
                    f"last step {last['age_s']:.1f} s ago")
    else:
        head.append(f"step 0/{total} done  policy v{status['policy_version']}  no optimizer step yet")
    rows = []
    for a in status["actors"]:
        state = a["state"] if a["alive"] else f"{a['state']} (no heartbeat)"
        rows.append([a["actor"], a["role"], a["host"], a["pid"], state,
                     None if a["policy_version"] is None else f"v{a['policy_version']}",
                     _num(a.get("heartbeat_age_s"), 1, " s"), a.get("items_done"), a.get("items_failed"),
                     _num(a.get("busy_s"), 1, " s")])
    parts = ["\n".join(head), "",
             table(["actor", "role", "host", "pid", "state", "policy", "heartbeat", "items", "failed", "busy"], rows)
             if rows else "no actor heartbeats in KV"]
    queue_rows = [[stage, q["queued"], q["in_progress"], q["redelivered"], q["waiting_pulls"]]
                  for stage, q in status["queues"].items()]
    parts += ["", table(["stage", "queued", "in progress", "redelivered", "waiting pulls"], queue_rows)
              if queue_rows else "no work queues"]
    if status["dead_letters"]:
        parts += ["", "dead letters: " + ", ".join(f"{s} {n}" for s, n in status["dead_letters"].items())]
    for problem in status["problems"]:
        parts += [f"warning: {problem}"]
    return "\n".join(parts) + "\n"


def status_command(nats_url: str, run: str, as_json: bool, window_s: float = 60.0, timeout_s: float = 10.0,
                   security: SecuritySettings | None = None) -> str:
    """What `asyncflow status` prints."""
    status = asyncio.run(collect_status(nats_url, run, window_s=window_s, timeout_s=timeout_s, security=security))
    return json.dumps(status, indent=2) + "\n" if as_json else format_status(status)
