"""`asyncflow inspect --nats URL --run NAME`: a run's NATS objects, for users without the NATS CLI.

Lists what `nats stream ls` / `nats consumer info` / `nats kv ls` / `nats micro ls` / `nats sub`
would show for one run (docs/inspect.md gives those commands):

- the run's streams (`AF_<RUN>_WORK`, `AF_<RUN>_EVENTS`) with their subjects, retention, message
  counts and per-subject counts;
- every consumer on them (the durable per-stage work consumers, and the ephemeral ordered consumers
  actors and the launcher use to follow EVENTS);
- the keys of the KV bucket `AF_<RUN>` with a short preview of each value (the resolved config is
  only summarised: it is long, and a broker URL in it may carry credentials);
- the run's `asyncflow-<role>` micro services and their endpoints;
- the last N messages of the EVENTS stream, one line each.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StreamInfo
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from actors.micro import SERVICE_PREFIX
from asyncflow.config import SecuritySettings
from asyncflow.status import gather_replies, kv_keys, open_run, redact_url, table
from broker import RunNames
from broker.names import KV_CONFIG

PREVIEW_CHARS = 160


async def collect_inspection(nats_url: str, run: str, *, events: int = 20, timeout_s: float = 10.0,
                             discover_s: float = 1.0, security: SecuritySettings | None = None) -> dict[str, Any]:
    """The run's streams, consumers, KV keys, micro services and last `events` events, JSON-ready."""
    names = RunNames(run)
    nc, js, kv = await open_run(nats_url, run, timeout_s, "asyncflow-inspect", security)
    try:
        streams = []
        for stream in (names.work_stream, names.events_stream):
            try:
                info = await js.stream_info(stream, subjects_filter=">")
            except NotFoundError:
                streams.append({"name": stream, "missing": True})
                continue
            consumers = await js.consumers_info(stream)
            streams.append(_stream(info, consumers))

        def ours(reply: dict[str, Any]) -> bool:
            return str(reply.get("name", "")).startswith(SERVICE_PREFIX) and reply.get("metadata", {}).get("run") == run

        services = sorted(
            ({"name": r["name"], "id": r.get("id"), "version": r.get("version"), "metadata": r.get("metadata", {}),
              "endpoints": [{"name": e.get("name"), "subject": e.get("subject")} for e in r.get("endpoints", [])]}
             for r in await gather_replies(nc, "$SRV.INFO", discover_s) if ours(r)),
            key=lambda s: str(s["metadata"].get("actor")),
        )
        return {
            "run": run, "nats": redact_url(nats_url), "streams": streams,
            "kv": await _kv(js, kv, names), "services": services,
            "events": await _recent_events(js, names, events),
        }
    finally:
        await nc.close()


def _stream(info: StreamInfo, consumers: list[ConsumerInfo]) -> dict[str, Any]:
    config, state = info.config, info.state
    return {
        "name": config.name, "subjects": list(config.subjects or []),
        "retention": getattr(config.retention, "value", config.retention),
        "storage": getattr(config.storage, "value", config.storage),
        "messages": state.messages, "bytes": state.bytes, "first_seq": state.first_seq, "last_seq": state.last_seq,
        "subject_counts": dict(sorted((state.subjects or {}).items())),
        "consumers": [_consumer(c) for c in sorted(consumers, key=lambda c: c.name)],
    }


def _consumer(info: ConsumerInfo) -> dict[str, Any]:
    config = info.config
    return {
        "name": info.name, "durable": bool(config.durable_name),
        "filter": config.filter_subject or ", ".join(config.filter_subjects or []) or None,
        "deliver_policy": getattr(config.deliver_policy, "value", config.deliver_policy),
        "ack_policy": getattr(config.ack_policy, "value", config.ack_policy),
        "pending": info.num_pending, "ack_pending": info.num_ack_pending,
        "redelivered": info.num_redelivered, "waiting_pulls": info.num_waiting,
        "max_deliver": config.max_deliver, "ack_wait_s": config.ack_wait,
        "description": config.description,
    }


async def _kv(js: JetStreamContext, kv: KeyValue, names: RunNames) -> dict[str, Any]:
    status = await kv.status()
    keys = []
    for key in await kv_keys(kv):
        try:
            entry = await kv.get(key)
        except NotFoundError:
            continue
        value = entry.value or b""
        keys.append({"key": key, "revision": entry.revision, "bytes": len(value), "preview": _preview(key, value)})
    return {"bucket": names.kv_bucket, "history": status.history, "values": status.values, "keys": keys}


def _preview(key: str, value: bytes) -> str:
    if key == KV_CONFIG:  # long, and may hold credentials (broker.url): a summary only
        try:
            config = json.loads(value)
            run = config.get("run", {})
            return (f"resolved config (run {run.get('name')}, {run.get('steps')} steps, run_dir {run.get('run_dir')}); "
                    f"full: asyncflow config <run_dir>/config.yaml")
        except (ValueError, AttributeError):
            return "resolved config (unreadable JSON)"
    text = value.decode("utf-8", errors="replace")
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"


async def _recent_events(js: JetStreamContext, names: RunNames, count: int) -> list[dict[str, Any]]:
    """The last `count` messages of the EVENTS stream, oldest first (direct gets by sequence)."""
    try:
        info = await js.stream_info(names.events_stream)
    except NotFoundError:
        return []
    out = []
    for seq in range(max(info.state.first_seq, info.state.last_seq - count + 1), info.state.last_seq + 1):
        if seq <= 0:
            continue
        try:
            msg = await js.get_msg(names.events_stream, seq)
        except NotFoundError:
            continue  # deleted
        out.append({"seq": seq, "time": msg.time.isoformat() if msg.time else None, "subject": msg.subject,
                    "bytes": len(msg.data or b""), "summary": summarize_event(msg.subject or "", msg.data or b"")})
    return out


def summarize_event(subject: str, data: bytes) -> str:
    """One line for an EVENTS message; tolerant (any JSON, or none), since this is for looking, not acting."""
    try:
        event = json.loads(data)
    except ValueError:
        return f"(not JSON, {len(data)} bytes)"
    if not isinstance(event, dict):
        return f"(JSON {type(event).__name__})"
    kind = subject.split(".")[2] if subject.count(".") >= 2 else "?"
    if kind == "done" and event.get("kind") == "step":
        return (f"step {event.get('step')} trained by {event.get('actor')}: policy v{event.get('policy_version')}, "
                f"{len(event.get('sample_ids', []))} samples, {event.get('failed_samples')} failed, "
                f"reward {event.get('reward_mean')}, loss {event.get('loss')}{' (final)' if event.get('final') else ''}")
    if kind == "done":
        failed = len(event.get("failed") or {})
        version = event.get("policy_version")
        columns = sorted({str(c.get("column")) for c in event.get("chunks", [])})
        return (f"{event.get('stage')} item {event.get('item_id')} done by {event.get('actor')}: partition "
                f"{event.get('partition')}, {len(event.get('sample_ids', []))} samples"
                + (f", {failed} failed" if failed else "") + f", columns {', '.join(columns) or 'none'}"
                + ("" if version is None else f", policy v{version}"))
    if kind == "weights":
        weights = event.get("weights") or {}
        return f"policy v{event.get('version')} at {weights.get('location')} key {weights.get('key')} ({event.get('nbytes')} bytes)"
    if kind == "dead":
        return (f"dead letter at {event.get('stage')} after {event.get('deliveries')} deliveries: "
                f"{event.get('item_id') or 'unreadable message'}: {str(event.get('reason'))[:200]}")
    return json.dumps(event)[:PREVIEW_CHARS]


def format_inspection(report: dict[str, Any]) -> str:
    parts = [f"run {report['run']} at {report['nats']}"]
    for stream in report["streams"]:
        if stream.get("missing"):
            parts += ["", f"stream {stream['name']}: missing"]
            continue
        parts += ["", f"stream {stream['name']}  subjects {', '.join(stream['subjects'])}  {stream['retention']} "
                  f"retention, {stream['storage']} storage  {stream['messages']} messages, {stream['bytes']} bytes, "
                  f"seq {stream['first_seq']}..{stream['last_seq']}"]
        if stream["subject_counts"]:
            parts.append(table(["subject", "messages"], [[s, n] for s, n in stream["subject_counts"].items()]))
        rows = [[c["name"], "durable" if c["durable"] else "ephemeral", c["filter"], c["pending"], c["ack_pending"],
                 c["redelivered"], c["waiting_pulls"]] for c in stream["consumers"]]
        parts += ["", table(["consumer", "kind", "filter", "pending", "ack pending", "redelivered", "waiting"], rows)
                  if rows else "no consumers"]
    kv = report["kv"]
    parts += ["", f"KV bucket {kv['bucket']}  {len(kv['keys'])} keys (history {kv['history']})",
              table(["key", "revision", "bytes", "value"], [[k["key"], k["revision"], k["bytes"], k["preview"]]
                                                            for k in kv["keys"]])]
    parts += ["", f"micro services ({len(report['services'])})"]
    if report["services"]:
        parts.append(table(["service", "actor", "host", "pid", "id", "endpoints"], [
            [s["name"], s["metadata"].get("actor"), s["metadata"].get("host"), s["metadata"].get("pid"), s["id"],
             " ".join(e["subject"] for e in s["endpoints"])] for s in report["services"]]))
    parts += ["", f"last {len(report['events'])} events"]
    if report["events"]:
        parts.append(table(["seq", "time", "subject", "event"],
                           [[e["seq"], e["time"], e["subject"], e["summary"]] for e in report["events"]]))
    return "\n".join(parts) + "\n"


def inspect_command(nats_url: str, run: str, as_json: bool, events: int = 20, timeout_s: float = 10.0,
                    security: SecuritySettings | None = None) -> str:
    """What `asyncflow inspect` prints."""
    report = asyncio.run(collect_inspection(nats_url, run, events=events, timeout_s=timeout_s, security=security))
    return json.dumps(report, indent=2) + "\n" if as_json else format_inspection(report)
