"""The `asyncflow` command: `run` a whole job, `report` on one, or start one `actor` / `store` / `broker` by hand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asyncflow.errors import AsyncFlowError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole post-training job on this machine")
    run.add_argument("config", type=Path, help="run config (YAML)")
    run.add_argument("--run-dir", type=Path, help="override run.run_dir")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a config field, e.g. --set run.steps=3 (repeatable)")

    actor = sub.add_parser("actor", help="start one actor process")
    actor.add_argument("role", choices=["scheduler", "rollout", "reward", "trainer", "param_sync"])
    actor.add_argument("--config", type=Path, required=True, help="resolved run config (YAML)")
    actor.add_argument("--nats", required=True, help="NATS URL of the run's broker")
    actor.add_argument("--instance", type=int, default=0, help="instance number within the role")

    store = sub.add_parser("store", help="start one Flight store")
    store.add_argument("--host", default="127.0.0.1")
    store.add_argument("--port", type=int, default=0)
    store.add_argument("--capacity-bytes", type=int, default=2 * 1024**3)
    store.add_argument("--location-file", type=Path)

    report = sub.add_parser("report", help="draw a finished run: timeline, throughput, reward, staleness")
    report.add_argument("run_dir", type=Path, help="the run's directory (run.run_dir)")
    report.add_argument("--out", type=Path,
                        help="PNG to write (default RUN_DIR/report.png); the .html and .json go beside it")

    broker = sub.add_parser("broker", help="start an embedded NATS server with JetStream and wait")
    broker.add_argument("--store-dir", type=Path, default=Path("runs/broker"))
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=4222)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from asyncflow.config import load_config, parse_override
            from asyncflow.launcher import run

            overrides = dict(parse_override(text) for text in args.set)
            if args.run_dir:
                overrides["run.run_dir"] = str(args.run_dir)
            summary = run(load_config(args.config, overrides))
            print("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
            return 0
        if args.command == "actor":
            from asyncflow.actor_process import run_actor_process

            return run_actor_process(args.role, args.config, args.nats, args.instance)
        if args.command == "store":
            from flight_store.server import serve

            serve(args.host, args.port, args.capacity_bytes, args.location_file)
            return 0
        if args.command == "report":
            from asyncflow.report import write_report

            files = write_report(args.run_dir, args.out)
            print(f"report: {files.png} {files.html} {files.json}")
            return 0
        if args.command == "broker":
            import signal

            from broker import EmbeddedNatsServer

            stop_signals = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # sigwait needs them blocked
            with EmbeddedNatsServer(args.store_dir, host=args.host, port=args.port) as server:
                print(f"NATS with JetStream at {server.url}; Ctrl-C stops it", flush=True)
                signal.sigwait(stop_signals)
            return 0
    except AsyncFlowError as error:
        print(f"asyncflow: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
