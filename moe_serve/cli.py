"""The `moe-serve` command: parse arguments, load the config, call the right `serve`.

Exit codes: 0 ok; 2 bad config or arguments (the message names the field); 1 other failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moe_serve.errors import ConfigError


def _at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-serve", description="Serve MoE layers across machines.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run one expert worker of the world config")
    w.add_argument("--config", required=True, type=Path, help="world config YAML")
    w.add_argument("--worker-id", required=True, help="id of this worker in the config")
    m = sub.add_parser("master", help="run the master (gates, fan-out, combine)")
    m.add_argument("--config", required=True, type=Path, help="world config YAML")
    u = sub.add_parser("up", help="run the master and every worker as local child processes")
    u.add_argument("--config", required=True, type=Path, help="world config YAML")
    d = sub.add_parser("demo", help="synthetic model, master + 2 workers, parity and latency")
    d.add_argument(
        "--devices",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the workers put their experts (default: cpu)",
    )
    d.add_argument(
        "--requests", type=_at_least(10), default=200, help="latency samples, >= 10 (default: 200)"
    )
    b = sub.add_parser("bench", help="moe_serve vs in-process vs torch.distributed.rpc")
    b.add_argument("--config", required=True, type=Path, help="world config YAML")
    b.add_argument("--json", type=Path, help="write the results here")
    b.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    b.add_argument("--tokens", type=_at_least(1), nargs="+", default=[1, 8, 64, 512, 4096])
    b.add_argument("--clients", type=_at_least(1), nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    b.add_argument("--iters", type=_at_least(2), default=20, help="timed calls per point")
    b.add_argument("--seconds", type=float, default=2.0, help="per concurrency level")
    h = sub.add_parser("health", help="exit 0 if a server's gRPC health answers SERVING")
    h.add_argument("--address", help="host:port to check (default: the master of --config)")
    h.add_argument("--config", type=Path, help="world config whose security.tls to dial with")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    r = sub.add_parser(
        "reload", help="make the running master(s) and workers re-read the world config"
    )
    r.add_argument(
        "--config",
        required=True,
        type=Path,
        help="world config YAML, as the servers will read it (checked here first)",
    )
    r.add_argument(
        "--master",
        action="append",
        help="a master's host:port; repeat per master (default: the config's master.listen)",
    )
    r.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for each server's reload, experts loaded (default: 120)",
    )
    rb = sub.add_parser(
        "rebalance", help="re-place experts by the load a master observed, and apply it"
    )
    rb.add_argument("--config", required=True, type=Path, help="world config YAML in service")
    rb.add_argument(
        "--metrics", required=True, help="the master's metrics URL, e.g. http://10.0.0.10:9400"
    )
    rb.add_argument(
        "--replicas",
        type=_at_least(0),
        default=1,
        help="extra copies of the hottest experts per layer (default: 1)",
    )
    rb.add_argument(
        "--out",
        type=Path,
        help="write the new world config here and apply nothing (default: replace --config, "
        "keeping the old one as CONFIG.bak, and reload the servers)",
    )
    rb.add_argument(
        "--dry-run", action="store_true", help="plan and report only; write and apply nothing"
    )
    rb.add_argument(
        "--master",
        action="append",
        help="a master's host:port to reload; repeat per master (default: master.listen)",
    )
    from moe_serve.tools.planner import add_arguments  # stdlib imports only: cheap

    add_arguments(sub.add_parser("placement", help="plan a world config from a checkpoint"))
    return p


def _up(config: Path) -> int:
    from moe_serve.config import load_config
    from moe_serve.tools.launcher import ClusterError, LocalCluster

    cluster = LocalCluster(config, load_config(config))
    # SIGTERM behaves like Ctrl-C: stop every child, exit 0.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        cluster.start()
        print(
            f"moe-serve: ready; connect to the master at {cluster.master_address} "
            "(Ctrl-C stops everything)",
            flush=True,
        )
        name = cluster.wait()
        print(f"moe-serve: {name} exited unexpectedly; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moe-serve: stopping", flush=True)
        return 0
    except ClusterError as exc:
        print(f"moe-serve: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def _health(address: str | None, config: Path | None, timeout: float) -> int:
    from moe_serve.config import load_config
    from moe_serve.tools.launcher import dial_address, is_serving
    from moe_serve.transport.tls import ClientTLS

    cfg = None if config is None else load_config(config)
    if address is None:
        if cfg is None:
            raise ConfigError("--address: give the address to check, or --config for its master")
        address = dial_address(cfg.master.listen)
    tls = None if cfg is None else ClientTLS.from_config(cfg.security.tls)
    serving = is_serving(address, timeout=timeout, tls=tls)
    print(f"moe-serve health: {address} is {'SERVING' if serving else 'not serving'}")
    return 0 if serving else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "worker":
            from moe_serve.config import load_config
            from moe_serve.worker.server import main as worker_main

            worker_main(load_config(args.config), args.worker_id, args.config)
        elif args.command == "master":
            from moe_serve.config import load_config
            from moe_serve.master.server import main as master_main

            master_main(load_config(args.config), args.config)
        elif args.command == "up":
            return _up(args.config)
        elif args.command == "demo":
            from moe_serve.tools.demo import run

            return run(args.devices, args.requests)
        elif args.command == "bench":
            from moe_serve.config import load_config
            from moe_serve.tools.bench import run as bench_run

            bench_run(
                args.config,
                load_config(args.config),
                args.json,
                args.plot,
                args.tokens,
                args.clients,
                args.iters,
                args.seconds,
            )
        elif args.command == "health":
            return _health(args.address, args.config, args.timeout)
        elif args.command == "reload":
            from moe_serve.tools.reload import main as reload_main

            return reload_main(args)
        elif args.command == "rebalance":
            from moe_serve.tools.rebalance import main as rebalance_main

            return rebalance_main(args)
        elif args.command == "placement":
            from moe_serve.tools.planner import main as placement_main

            return placement_main(args)
    except ConfigError as exc:
        print(f"moe-serve {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
