"""The embedded broker: starts on a free loopback port, builds the run's topology, leaves no orphan."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker import EmbeddedNatsServer, RunNames, connect, ensure_topology


def test_server_binds_loopback_on_free_port(tmp_path: Path):
    first = EmbeddedNatsServer(tmp_path / "a")
    second = EmbeddedNatsServer(tmp_path / "b")
    with first, second:
        assert first.url.startswith("nats://127.0.0.1:") and first.url != second.url
    assert first.process.poll() is not None and second.process.poll() is not None


def test_topology_streams_consumers_and_kv(nats_server):
    async def check():
        nc = await connect(nats_server.url, "test")
        js = nc.jetstream()
        names = RunNames("t1")
        await ensure_topology(js, names, ack_wait_s=30, max_deliver=3)
        await ensure_topology(js, names, ack_wait_s=30, max_deliver=3)  # idempotent
        work = await js.stream_info(names.work_stream)
        assert work.config.retention == "workqueue" and work.config.subjects == ["af.t1.work.>"]
        events = await js.stream_info(names.events_stream)
        assert set(events.config.subjects) == {"af.t1.done.>", "af.t1.weights", "af.t1.dead.>", "af.t1.lost.>"}
        for stage in ("rollout", "reward", "trainer"):
            info = await js.consumer_info(names.work_stream, stage)
            assert info.config.filter_subject == f"af.t1.work.{stage}" and info.config.max_deliver == 3
        kv = await js.key_value(names.kv_bucket)
        await kv.put("policy_version", b"3")
        assert (await kv.get("policy_version")).value == b"3"
        # work-queue semantics: an item goes to one instance and is gone once acked
        await js.publish(names.work("reward"), b"item")
        sub = await js.pull_subscribe_bind("reward", stream=names.work_stream)
        (msg,) = await sub.fetch(1, timeout=5)
        await msg.ack_sync()
        assert (await js.stream_info(names.work_stream)).state.messages == 0
        await nc.close()

    asyncio.run(check())


def test_no_orphan_broker_when_owner_is_killed(tmp_path: Path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from broker import EmbeddedNatsServer
        server = EmbeddedNatsServer(Path({str(tmp_path / 'js')!r}))
        server.start()
        print(server.pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent)
    nats_pid = int(owner.stdout.readline())
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _alive(nats_pid):
            return
        time.sleep(0.1)
    pytest.fail(f"nats-server {nats_pid} still alive after its owner was SIGKILLed")


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
