"""The `asyncflow` command: `run` a whole job, `report` on one, or start one `actor` / `store` / `broker` by hand;
`status`, `inspect` and `config` look at live runs and configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from asyncflow.errors import AsyncFlowError

if TYPE_CHECKING:
    from asyncflow.config import SecuritySettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole post-training job on this machine")
    run.add_argument("config", type=Path, nargs="?", help="run config (YAML); not with --resume")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a killed or stopped run from its newest checkpoint, with its own config")
    run.add_argument("--run-dir", type=Path, help="override run.run_dir")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a config field, e.g. --set run.steps=3 (repeatable)")

    actor = sub.add_parser("actor", help="start one actor process")
    actor.add_argument("role", choices=["scheduler", "rollout", "reward", "trainer", "param_sync"])
    actor.add_argument("--config", type=Path, required=True, help="resolved run config (YAML)")
    actor.add_argument("--nats", required=True, help="NATS URL of the run's broker")
    actor.add_argument("--instance", type=int, default=0, help="instance number within the role")
    actor.add_argument("--tls-ca", type=Path, help="CA bundle on this host (overrides security.tls_ca); secrets "
                                                   "come from the environment, see docs/security.md")

    store = sub.add_parser("store", help="start one Flight store")
    store.add_argument("--host", default="127.0.0.1")
    store.add_argument("--port", type=int, default=0)
    store.add_argument("--capacity-bytes", type=int, default=2 * 1024**3)
    store.add_argument("--location-file", type=Path)
    store.add_argument("--tls-cert", type=Path, help="PEM certificate: serve TLS only (grpc+tls://)")
    store.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    store.add_argument("--token-env", metavar="VAR", help="require the token held in environment variable VAR")

    report = sub.add_parser("report", help="draw a finished run: timeline, throughput, reward, staleness")
    report.add_argument("run_dir", type=Path, help="the run's directory (run.run_dir)")
    report.add_argument("--out", type=Path,
                        help="PNG to write (default RUN_DIR/report.png); the .html and .json go beside it")

    broker = sub.add_parser("broker", help="start an embedded NATS server with JetStream and wait")
    broker.add_argument("--store-dir", type=Path, default=Path("runs/broker"))
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=4222)
    broker.add_argument("--tls-cert", type=Path, help="PEM certificate: accept TLS connections only")
    broker.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    broker.add_argument("--nats-auth", choices=["none", "token", "user"], default="none",
                        help="require a token or a user + password (secrets from the environment)")
    broker.add_argument("--nats-user", help="user name for --nats-auth user")
    broker.add_argument("--nats-token-env", default="ASYNCFLOW_NATS_TOKEN", metavar="VAR")
    broker.add_argument("--nats-password-env", default="ASYNCFLOW_NATS_PASSWORD", metavar="VAR")

    # Hand-started runs (docker-compose, several hosts): asyncflow/standalone.py, docs/deploy.md.
    setup = sub.add_parser("setup", help="one-shot: prepare inputs and create a hand-started run's "
                                         "streams, consumers and KV entries on a broker")
    setup.add_argument("config", type=Path, help="run config (YAML) naming the stores in store.locations")
    setup.add_argument("--nats", required=True, help="NATS URL of the run's broker")
    setup.add_argument("--fresh", action="store_true",
                       help="delete a previous run of the same name first (default: resume it)")

    follow = sub.add_parser("follow", help="follow a hand-started run to its final step, write metrics "
                                           "and summary.json, then stop its actors")
    follow.add_argument("config", type=Path, help="run config (YAML)")
    follow.add_argument("--nats", required=True, help="NATS URL of the run's broker")

    health = sub.add_parser("health", help="exit 0 if a broker, a store or an actor is healthy, else 1 "
                                           "(docker healthchecks)")
    health.add_argument("--nats", help="NATS URL: checks the broker answers with JetStream")
    health.add_argument("--store", help="Flight location grpc://host:port: checks the store answers")
    health.add_argument("--actor", help="actor id such as rollout-0: checks its heartbeat is fresh "
                                        "(needs --nats and --config)")
    health.add_argument("--config", type=Path, help="run config (YAML): needed with --actor; gives the "
                                                    "credentials/TLS of its `security` section to every check")
    health.add_argument("--max-age-s", type=float, help="oldest acceptable heartbeat (default broker.heartbeat_timeout_s)")
    # Looking at runs: asyncflow/status.py, asyncflow/inspect_run.py, asyncflow/config_reference.py.
    status = sub.add_parser("status", help="show a live run: actors, queue depth per stage, step, reward, samples/s",
                            description="Show a live run from its broker: each actor (role, host, pid, state, "
                                        "policy version, heartbeat age, items done), queue depth per stage, "
                                        "current step, reward and samples/s.")
    status.add_argument("--nats", required=True, help="NATS URL of the run's broker")
    status.add_argument("--run", required=True, help="run name (run.name)")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.add_argument("--window-s", type=float, default=60.0,
                        help="samples/s and the recent reward over the steps of this many seconds (default 60)")
    status.add_argument("--timeout-s", type=float, default=10.0, help="timeout of each broker request (default 10)")
    status.add_argument("--config", type=Path, help="run config whose `security` section says how to authenticate "
                                                    "(secrets from the environment) and whether to use TLS")

    inspect = sub.add_parser("inspect", help="list a run's streams, consumers, KV keys, micro services and "
                                             "recent events (no NATS CLI needed)",
                             description="List a run's JetStream streams and consumers, KV keys, micro "
                                         "services and the last events, as the NATS CLI would show them "
                                         "(docs/inspect.md).")
    inspect.add_argument("--nats", required=True, help="NATS URL of the run's broker")
    inspect.add_argument("--run", required=True, help="run name (run.name)")
    inspect.add_argument("--events", type=int, default=20, help="how many of the newest EVENTS to show (default 20)")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    inspect.add_argument("--timeout-s", type=float, default=10.0, help="timeout of each broker request (default 10)")
    inspect.add_argument("--config", type=Path, help="run config whose `security` section says how to authenticate "
                                                     "(secrets from the environment) and whether to use TLS")

    config = sub.add_parser("config", help="print a resolved config, or the reference of every config field",
                            description="Print CONFIG as the actors would read it (overrides applied, paths "
                                        "absolute, defaults filled in), or with --reference the Markdown "
                                        "reference of every field (docs/config.md).")
    config.add_argument("config", type=Path, nargs="?", help="run config (YAML)")
    config.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set run.steps=3 (repeatable)")
    config.add_argument("--reference", action="store_true",
                        help="print the Markdown reference of every config field instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from asyncflow.config import load_config, parse_override
            from asyncflow.errors import ConfigError
            from asyncflow.launcher import resume, run

            if (args.config is None) == (args.resume is None):
                raise ConfigError("asyncflow run needs either CONFIG or --resume RUN_DIR (not both)")
            if args.resume is not None and args.run_dir is not None:
                raise ConfigError("--resume RUN_DIR continues the run in RUN_DIR: --run-dir cannot move it")
            overrides = dict(parse_override(text) for text in args.set)
            if args.resume is not None:
                summary = resume(args.resume, overrides)
            else:
                if args.run_dir:
                    overrides["run.run_dir"] = str(args.run_dir)
                summary = run(load_config(args.config, overrides))
            print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
            return 0
        if args.command == "actor":
            from asyncflow.actor_process import run_actor_process

            return run_actor_process(args.role, args.config, args.nats, args.instance, tls_ca=args.tls_ca,
                                     exit_when_stopped=True)
        if args.command == "store":
            from flight_store.server import serve

            serve(args.host, args.port, args.capacity_bytes, args.location_file,
                  tls_cert=args.tls_cert, tls_key=args.tls_key, token_env=args.token_env)
            return 0
        if args.command == "report":
            from asyncflow.report import write_report

            files = write_report(args.run_dir, args.out)
            print(f"report: {files.png} {files.html} {files.json}")
            return 0
        if args.command == "broker":
            import signal

            from asyncflow.config import SecuritySettings
            from asyncflow.errors import ConfigError
            from broker import EmbeddedNatsServer

            try:
                security = SecuritySettings(
                    nats_auth=args.nats_auth, nats_user=args.nats_user, nats_token_env=args.nats_token_env,
                    nats_password_env=args.nats_password_env, nats_tls=args.tls_cert is not None,
                    tls_cert=args.tls_cert, tls_key=args.tls_key)
            except ValueError as error:  # pydantic's ValidationError: --nats-user missing, key without cert
                raise ConfigError(f"asyncflow broker: {error}") from None
            stop_signals = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # sigwait needs them blocked
            with EmbeddedNatsServer(args.store_dir, host=args.host, port=args.port, security=security) as server:
                print(f"NATS with JetStream at {server.url}; Ctrl-C stops it", flush=True)
                signal.sigwait(stop_signals)
            return 0
        if args.command in ("setup", "follow"):
            from asyncflow import standalone
            from asyncflow.config import load_config

            config = load_config(args.config).resolved()
            if args.command == "setup":
                standalone.setup(config, args.nats, fresh=args.fresh)
                print(f"run {config.run.name} set up on {args.nats}", flush=True)
            else:
                summary = standalone.follow(config, args.nats)
                print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
            return 0
        if args.command == "health":
            return _health(args)
        if args.command == "status":
            from asyncflow.status import status_command

            print(status_command(args.nats, args.run, args.json, args.window_s, args.timeout_s,
                                 _security(args.config)), end="")
            return 0
        if args.command == "inspect":
            from asyncflow.inspect_run import inspect_command

            print(inspect_command(args.nats, args.run, args.json, args.events, args.timeout_s,
                                  _security(args.config)), end="")
            return 0
        if args.command == "config":
            return _config(args)
    except AsyncFlowError as error:
        print(f"asyncflow: error: {error}", file=sys.stderr)
        return 2
    return 1


def _health(args: argparse.Namespace) -> int:
    from asyncflow import standalone
    from asyncflow.config import load_config

    if args.actor:
        if not (args.nats and args.config):
            raise SystemExit("asyncflow health --actor needs --nats and --config")
        problem = standalone.check_actor(load_config(args.config), args.nats, args.actor, args.max_age_s)
    elif args.store:
        problem = standalone.check_store(args.store, _security(args.config))
    elif args.nats:
        problem = standalone.check_broker(args.nats, _security(args.config))
    else:
        raise SystemExit("asyncflow health needs --nats, --store or --actor")
    print(f"unhealthy: {problem}" if problem else "healthy", flush=True)
    return 1 if problem else 0


def _security(config_path: Path | None) -> SecuritySettings | None:
    """The `security` section of a run config, for commands that connect to its broker."""
    if config_path is None:
        return None
    from asyncflow.config import load_config

    return load_config(config_path).security


def _config(args: argparse.Namespace) -> int:
    from asyncflow.errors import ConfigError

    if args.reference:
        if args.config is not None or args.set:
            raise ConfigError("asyncflow config --reference takes no CONFIG or --set")
        from asyncflow.config_reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    if args.config is None:
        raise ConfigError("asyncflow config needs CONFIG (or --reference)")
    from asyncflow.config import load_config, parse_override

    overrides = dict(parse_override(text) for text in args.set)
    print(load_config(args.config, overrides).resolved().to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
