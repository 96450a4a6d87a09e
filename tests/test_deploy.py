"""deploy/ is known to work, not only to parse.

- `docker-compose config -q` validates deploy/docker-compose.yml (Debian's docker-compose v1 needs
  no engine; the test skips with the reason when the binary is absent).
- The compose file's own service commands, healthchecks, environment and depends_on order are
  run as local processes (service hostnames → 127.0.0.1, container ports → free ports, volumes →
  temporary folders, deploy/config.yaml shrunk to a 3-step run) and the run completes.
- The Dockerfiles install as the Makefile does; the 3-node NATS cluster configs form a JetStream
  cluster on which a run's topology is created on one node and read on another.
- `asyncflow health` says what is down; the README's reward example keeps the reward contract.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.trainer import read_records
from asyncflow import cli
from asyncflow.launcher import stop_processes

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ACTOR_SERVICES = {"scheduler", "rollout-0", "rollout-1", "reward", "trainer", "param-sync"}
SERVICES = ACTOR_SERVICES | {"nats", "store", "setup", "follow"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the `<<: *anchor` merges


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- static checks ---------------------------------------------------------------------------------

def test_compose_file_validates_with_docker_compose(tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (make test installs it: "
                    "apt-get install -y --no-install-recommends docker-compose)")
    done = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"docker-compose rejects {COMPOSE}:\n{done.stderr}"
    gpu = [binary, "-f", str(COMPOSE), "-f", str(DEPLOY / "docker-compose.cuda.yml"), "config"]
    done = subprocess.run(gpu, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"docker-compose rejects the CUDA override:\n{done.stderr}"
    merged = yaml.safe_load(done.stdout)["services"]
    for name in ("rollout-0", "rollout-1", "trainer"):
        assert merged[name]["image"] == "asyncflow:cuda" and merged[name]["deploy"]["resources"]
    for name in SERVICES - {"nats", "store"}:  # one config for every service that reads one
        assert any(v.endswith("/deploy/config.cuda.yaml:/config/run.yaml:ro") for v in merged[name]["volumes"]), name
    # The validator is not a rubber stamp: a dependency on a service that does not exist fails.
    broken = _compose()
    broken["services"]["setup"]["depends_on"]["ghost"] = {"condition": "service_healthy"}
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    done = subprocess.run([binary, "-f", str(bad), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ghost" in done.stderr, done.stderr


def test_compose_services_are_the_documented_ones():
    compose = _compose()
    services = compose["services"]
    assert set(services) == SERVICES
    config = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    assert config["rollout"]["instances"] == len([s for s in services if s.startswith("rollout-")])
    for name, service in services.items():
        assert service["command"][0] == "asyncflow", f"{name} does not start with the asyncflow CLI"
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "asyncflow", "health"], f"{name}: healthcheck {test}"
        mounts = [v.split(":")[1] for v in service.get("volumes", [])]
        if name in ACTOR_SERVICES | {"setup", "follow"}:
            assert {"/runs", "/data", "/config/run.yaml"} <= set(mounts), f"{name} mounts {mounts}"
            assert "nats://nats:4222" in service["command"], f"{name} does not use the nats service"
    assert "/nats" in [v.split(":")[1] for v in services["nats"]["volumes"]]
    assert config["run"]["run_dir"].startswith("/runs/")
    # Each actor's healthcheck names the actor its own command starts.
    for name in ACTOR_SERVICES:
        command, test = services[name]["command"], services[name]["healthcheck"]["test"]
        role, instance = command[2], command[command.index("--instance") + 1]
        assert test[test.index("--actor") + 1] == f"{role}-{instance}"


def test_shipped_deploy_configs_parse():
    from asyncflow.config import load_config

    cpu, gpu = load_config(DEPLOY / "config.yaml"), load_config(DEPLOY / "config.cuda.yaml")
    assert cpu.broker.url == gpu.broker.url == "nats://nats:4222"
    assert cpu.store.locations == gpu.store.locations == ["grpc://store:8815"]
    assert gpu.rollout.engine.type == "vllm" and gpu.trainer.engine.device == "cuda"
    assert cpu.model_dump(exclude={"rollout", "trainer"}) == gpu.model_dump(exclude={"rollout", "trainer"})
    # The auth variant differs from the plain one only in its security section.
    auth = load_config(DEPLOY / "config.auth.yaml")
    assert auth.security.nats_auth == auth.security.store_auth == "token"
    assert auth.security.nats_token is None and auth.security.store_token is None  # tokens: environment only
    assert cpu.model_dump(exclude={"security"}) == auth.model_dump(exclude={"security"})


def test_dockerfiles_install_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in makefile and "-c constraints.txt" in makefile
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        assert text.startswith("#") and "FROM python:3.11-slim" in text
        torch_at = text.index("torch==2.13.0")
        project_at = text.index('-c constraints.txt ".[${EXTRAS}]"')
        assert torch_at < project_at, f"{name}: torch must be installed before the project"
        allowed = {line[1:] for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
                   if line.startswith("!")}
        for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, flags=re.M):
            for path in source.split():
                assert (ROOT / path).exists(), f"{name}: COPY source {path} is not in the repository"
                assert path in allowed, f"{name}.dockerignore keeps COPY source {path} out of the context"
        packages = re.findall(r'"(\w+)\*"', (ROOT / "pyproject.toml").read_text().split("packages.find")[1])
        for package in set(packages) - {"bench"}:  # bench/ is not needed to run
            assert f"COPY {package} ./{package}" in text, f"{name} does not copy package {package}"


# -- health checks ---------------------------------------------------------------------------------

def test_health_command_reports_what_is_down(tmp_path, nats_server, flight_store_server, capsys,
                                             tiny_model_dir, arith_dataset):
    from tests.conftest import make_tiny_config

    assert cli.main(["health", "--nats", nats_server.url]) == 0
    assert cli.main(["health", "--store", flight_store_server.location]) == 0
    dead = f"127.0.0.1:{_free_port()}"
    assert cli.main(["health", "--nats", f"nats://{dead}"]) == 1
    assert f"cannot connect to NATS at nats://{dead}" in capsys.readouterr().out
    assert cli.main(["health", "--store", f"grpc://{dead}"]) == 1
    assert f"Flight store at grpc://{dead}" in capsys.readouterr().out
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, "health",
                              store={"locations": [flight_store_server.location]})
    config_path = tmp_path / "run.yaml"
    config_path.write_text(config.to_yaml())
    assert cli.main(["setup", str(config_path), "--nats", nats_server.url]) == 0
    assert cli.main(["health", "--nats", nats_server.url, "--config", str(config_path), "--actor", "rollout-7"]) == 1
    assert "actor rollout-7 has no heartbeat in KV bucket AF_HEALTH" in capsys.readouterr().out


# -- the compose file, run as local processes ------------------------------------------------------

class LocalCompose:
    """Runs a compose file's services as local processes, as the containers would run them."""

    def __init__(self, compose: dict[str, Any], root: Path, log_dir: Path) -> None:
        self.services: dict[str, Any] = compose["services"]
        self.root = root
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # Container ports the services listen on (`--port N`) get free local ones.
        self.ports = {}
        for service in self.services.values():
            command = service["command"]
            if "--port" in command:
                self.ports[command[command.index("--port") + 1]] = str(_free_port())
        # Named volumes and bind mounts → local folders / files.
        self.mounts: dict[str, Path] = {}
        for service in self.services.values():
            for volume in service.get("volumes", []):
                source, target = volume.split(":")[:2]
                if source.startswith((".", "/")):  # a bind mount (absolute once docker-compose merged it)
                    self.mounts[target] = root / "bind" / Path(source).name
                else:
                    self.mounts[target] = root / "volumes" / source
        for target, local in self.mounts.items():
            if not target.endswith((".yaml", ".yml")):
                local.mkdir(parents=True, exist_ok=True)

    def map(self, text: str) -> str:
        """One argument or config value as it is on this machine."""
        hosts = set(self.services) | {"localhost", "0.0.0.0"}

        def url(match: re.Match[str]) -> str:
            scheme, host, port = match.groups()
            assert host in hosts, f"{text} names host {host}, which is no service"
            return f"{scheme}://127.0.0.1:{self.ports[port]}"

        text = re.sub(r"(nats|grpc)://([A-Za-z0-9_.-]+):(\d+)", url, text)
        if text == "0.0.0.0":
            return "127.0.0.1"  # a test binds loopback only
        for target, local in self.mounts.items():
            if text == target or text.startswith(target + "/"):
                return str(local) + text[len(target):]
        return text

    def argv(self, command: list[str]) -> list[str]:
        mapped = [self.map(str(arg)) for arg in command]
        for index, arg in enumerate(command[:-1]):
            if arg == "--port":
                mapped[index + 1] = self.ports[str(command[index + 1])]
        assert mapped[0] == "asyncflow"
        return [sys.executable, "-m", "asyncflow", *mapped[1:]]

    def env(self, name: str) -> dict[str, str]:
        environment = self.services[name].get("environment") or {}
        return dict(os.environ, **{k: str(v) for k, v in environment.items() if v is not None})

    def start(self, name: str, deadline: float) -> None:
        if name in self.processes:
            return
        depends = self.services[name].get("depends_on") or {}
        for dependency, condition in (depends.items() if isinstance(depends, dict) else
                                      ((d, {"condition": "service_started"}) for d in depends)):
            self.start(dependency, deadline)
            self.wait_for(dependency, condition["condition"], deadline)
        log = (self.log_dir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            self.argv(self.services[name]["command"]), cwd=ROOT, env=self.env(name),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def healthcheck(self, name: str) -> int:
        """Run the service's healthcheck command; its exit code."""
        return self.start_healthcheck(name).wait(timeout=60)

    def start_healthcheck(self, name: str) -> subprocess.Popen[bytes]:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: healthcheck {test} is not in exec form"
        out = (self.log_dir / f"{name}.health.log").open("ab")  # the last line says why it failed
        try:
            return subprocess.Popen(self.argv(test[1:]), cwd=ROOT, env=self.env(name),
                                    stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def wait_for(self, name: str, condition: str, deadline: float) -> None:
        process = self.processes[name]
        while True:
            if condition == "service_started":
                return
            if condition == "service_completed_successfully" and process.poll() is not None:
                assert process.returncode == 0, f"{name} exited with {process.returncode}:\n{self.tail(name)}"
                return
            if condition == "service_healthy":
                assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.tail(name)}"
                if self.healthcheck(name) == 0:
                    return
            assert time.monotonic() < deadline, (f"{name} not {condition} in time:\n{self.tail(name)}\n"
                                                 f"healthcheck: {self.tail(name + '.health', 300)}")
            time.sleep(0.5)

    def tail(self, name: str, chars: int = 2500) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-chars:]

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(name, 1500)}" for name in self.processes)


def _write_local_config(compose: LocalCompose, source: Path) -> dict[str, Any]:
    """`source` as the containers see it at /config/run.yaml, shrunk to a short run; every path and
    address in it goes through the same mapping as the commands."""

    def mapped(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mapped(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mapped(v) for v in value]
        return compose.map(value) if isinstance(value, str) else value

    config = mapped(yaml.safe_load(source.read_text()))
    # Generous limits: ten processes importing torch at once on a small shared machine take minutes.
    config["run"].update(steps=3, stall_timeout_s=400, timeout_s=500, missing_stage_timeout_s=400)
    config["algorithm"].update(prompts_per_step=4, samples_per_prompt=4)
    config["trainer"]["engine"]["micro_batch_size"] = 16
    config_file = compose.mounts["/config/run.yaml"]
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config))
    compose.log_dir.mkdir(parents=True, exist_ok=True)
    return config


@pytest.mark.slow
def test_compose_services_run_as_local_processes_and_the_run_completes(tmp_path):
    compose = LocalCompose(_compose(), tmp_path, tmp_path / "logs")
    config = _write_local_config(compose, DEPLOY / "config.yaml")
    run_dir = Path(config["run"]["run_dir"])

    deadline = time.monotonic() + 500
    try:
        for name in compose.services:
            compose.start(name, deadline)
        # Each actor's own healthcheck passes while the actor runs.
        healthy: set[str] = set()
        while not healthy >= ACTOR_SERVICES:
            assert compose.processes["follow"].poll() is None, (
                f"the run ended before {ACTOR_SERVICES - healthy} passed a healthcheck:\n{compose.tails()}")
            assert time.monotonic() < deadline, f"unhealthy: {ACTOR_SERVICES - healthy}\n{compose.tails()}"
            # All pending checks at once: the window between an actor's first heartbeat and the
            # end of a 3-step run is a few seconds once the models are loaded.
            alive = [n for n in sorted(ACTOR_SERVICES - healthy) if compose.processes[n].poll() is None]
            checks = {name: compose.start_healthcheck(name) for name in alive}
            for name, check in checks.items():
                if check.wait(timeout=60) == 0 and compose.processes[name].poll() is None:
                    healthy.add(name)
            time.sleep(0.2)
        compose.wait_for("follow", "service_completed_successfully", deadline)
        # `follow` told the actors to stop: they exit by themselves, cleanly.
        for name in ACTOR_SERVICES:
            try:
                compose.processes[name].wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not stop after the run finished:\n{compose.tail(name)}")
            assert compose.processes[name].returncode == 0, f"{name}:\n{compose.tail(name)}"
        for name in ("nats", "store"):
            compose.processes[name].send_signal(signal.SIGTERM)
            assert compose.processes[name].wait(timeout=30) == 0, compose.tail(name)
    finally:
        stop_processes(list(compose.processes.values()), grace_s=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 3 * 4 * 4
    assert sorted(r["sample_id"] for r in read_records(run_dir)) == list(range(3 * 4 * 4))
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    # setup built the model and the dataset into the `data` volume, as in the containers.
    assert (compose.mounts["/data"] / "models" / "tiny-arith" / "config.json").is_file()
    # The run directory is complete enough for `asyncflow report`, as after `asyncflow run`.
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").stat().st_size > 0


def test_auth_override_makes_broker_and_store_require_their_tokens(tmp_path):
    """docker-compose.auth.yml merged by docker-compose itself: the broker and the store started
    from it refuse clients without the tokens, their healthchecks (which read the config's
    `security` section and the tokens from the environment) pass, setup gets through, and no
    token value lands in a log."""
    import secrets

    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed: it merges the override files")
    tokens = {"ASYNCFLOW_NATS_TOKEN": secrets.token_hex(16), "ASYNCFLOW_STORE_TOKEN": secrets.token_hex(16)}
    merge = [binary, "-f", str(COMPOSE), "-f", str(DEPLOY / "docker-compose.auth.yml"), "config"]
    done = subprocess.run(merge, capture_output=True, text=True, timeout=60, env=dict(os.environ, **tokens))
    assert done.returncode == 0, done.stderr
    compose = LocalCompose(yaml.safe_load(done.stdout), tmp_path, tmp_path / "logs")
    config = _write_local_config(compose, DEPLOY / "config.auth.yaml")
    assert config["security"] == {"nats_auth": "token", "store_auth": "token"}
    deadline = time.monotonic() + 180
    try:
        compose.start("setup", deadline)  # starts nats and store first, waits for their healthchecks
        compose.wait_for("setup", "service_completed_successfully", deadline)
        nats_url = compose.map("nats://nats:4222")
        store = compose.map("grpc://store:8815")
        assert cli.main(["health", "--nats", nats_url]) == 1, "the broker let a client in without the token"
        assert cli.main(["health", "--store", store]) == 1, "the store answered a client without the token"
        for name in ("nats", "store", "setup"):
            assert compose.healthcheck(name) == 0, f"{name}'s healthcheck fails with the tokens set"
    finally:
        stop_processes(list(compose.processes.values()), grace_s=0)
    for log in [*compose.log_dir.iterdir(), *compose.mounts["/runs"].rglob("*.jsonl")]:
        text = log.read_text(errors="replace")
        assert not any(token in text for token in tokens.values()), f"a token is in {log}"


# -- the 3-node NATS cluster -----------------------------------------------------------------------

def test_nats_cluster_configs_form_a_jetstream_cluster(tmp_path):
    from broker import RunNames, connect, ensure_topology
    from broker.server import find_nats_server

    nodes = sorted((DEPLOY / "nats-cluster").glob("nats-*.conf"))
    assert [n.name for n in nodes] == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    binary = find_nats_server()
    client, route, http = ({n.stem: _free_port() for n in nodes} for _ in range(3))
    processes = []
    try:
        for node in nodes:
            assert subprocess.run([binary, "-t", "-c", str(node)], capture_output=True, timeout=30).returncode == 0
            text = node.read_text()
            text = text.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client[node.stem]}")
            text = text.replace("http: 0.0.0.0:8222", f"http: 127.0.0.1:{http[node.stem]}")
            text = text.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{route[node.stem]}")
            text = text.replace("/var/lib/nats", str(tmp_path / node.stem))
            for other in nodes:
                text = text.replace(f"nats-route://{other.stem}:6222", f"nats-route://127.0.0.1:{route[other.stem]}")
            assert "0.0.0.0" not in text and ":6222" not in text
            local = tmp_path / node.name
            local.write_text(text)
            log = (tmp_path / f"{node.stem}.log").open("wb")
            processes.append(subprocess.Popen([binary, "-c", str(local)], stdout=log, stderr=subprocess.STDOUT))
            log.close()
        urls = [f"nats://127.0.0.1:{client[n.stem]}" for n in nodes]
        assert asyncio.run(asyncio.wait_for(_topology_across_nodes(urls, connect, ensure_topology, RunNames),
                                            timeout=90)) == b"seen from node 3"
        # broker.replicas 3: every stream and the KV bucket on all three nodes, so losing the node
        # that leads them loses nothing (R1, as above, would wait for that node to come back).
        leader = asyncio.run(asyncio.wait_for(_replicated_topology(urls, connect, ensure_topology, RunNames),
                                              timeout=90))
        killed = [n.stem for n in nodes].index(leader)
        processes[killed].kill()
        processes[killed].wait(timeout=10)
        alive = [url for i, url in enumerate(urls) if i != killed]
        assert asyncio.run(asyncio.wait_for(_read_after_node_loss(alive, connect, RunNames),
                                            timeout=90)) == (b"written before the loss", 1)
    finally:
        stop_processes(processes, grace_s=0)


async def _replicated_topology(urls, connect, ensure_topology, RunNames) -> str:  # type: ignore[no-untyped-def]
    """Create run `replicated` with 3 replicas through node 1; returns the server name of the node
    leading its KV bucket's stream."""
    names = RunNames("replicated")
    nc = await connect(urls[0], "test-replicas")
    try:
        js = nc.jetstream(timeout=5)
        await ensure_topology(js, names, replicas=3)
        for stream in (names.work_stream, names.events_stream, f"KV_{names.kv_bucket}"):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, (stream, info.config.num_replicas)
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, (stream, info.cluster)
        await (await js.key_value(names.kv_bucket)).put("probe", b"written before the loss")
        await js.publish(names.work("rollout"), b"{}")
        return (await js.stream_info(f"KV_{names.kv_bucket}")).cluster.leader
    finally:
        await nc.close()


async def _read_after_node_loss(urls, connect, RunNames) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """Through a surviving node, once the other two have elected a new leader: the KV value and the
    work item written before the loss."""
    names = RunNames("replicated")
    nc = await connect(urls[0], "test-after-loss")
    try:
        js = nc.jetstream(timeout=5)
        while True:  # no answer until a new leader is elected
            try:
                value = (await (await js.key_value(names.kv_bucket)).get("probe")).value
                messages = (await js.stream_info(names.work_stream)).state.messages
                return value, messages
            except Exception:
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _topology_across_nodes(urls, connect, ensure_topology, RunNames) -> bytes:  # type: ignore[no-untyped-def]
    names = RunNames("cluster")
    first = await connect(urls[0], "test-node-1")
    try:
        js = first.jetstream(timeout=5)
        while True:  # JetStream answers once the three nodes have elected a meta leader
            try:
                await ensure_topology(js, names)
                break
            except Exception:
                await asyncio.sleep(0.5)
        await (await js.key_value(names.kv_bucket)).put("probe", b"seen from node 3")
        # The client learnt the other nodes (what lets it fail over, docs/deploy.md).
        deadline = time.monotonic() + 30
        while len(first.discovered_servers) < 2:
            assert time.monotonic() < deadline, f"node 1 announced only {first.discovered_servers}"
            await asyncio.sleep(0.2)
    finally:
        await first.close()
    third = await connect(urls[2], "test-node-3")
    try:
        kv = await third.jetstream(timeout=5).key_value(names.kv_bucket)
        return (await kv.get("probe")).value
    finally:
        await third.close()


# -- the README's worked example -------------------------------------------------------------------

def test_readme_reward_example_keeps_the_contract(tmp_path, monkeypatch):
    from asyncflow.config import parse_config
    from asyncflow.hooks import load_callable
    from asyncflow.rewards import check_reward

    section = (ROOT / "README.md").read_text().split("## Worked example: a reward function")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1))
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert parse_config(config).reward.function == "my_rewards:exact_number"
    reward = load_callable(config["reward"]["function"], "reward.function")
    row = {"answer": "36"}
    scores = [check_reward(reward("What is 12*3?", response, **row)) for response in ("36", "It is 36.", "35", "")]
    assert scores == [1.0, 0.5, 0.0, 0.0]
