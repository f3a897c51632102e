"""`moe-serve reload`: make the running servers of a world re-read its config file, as SIGHUP
does (moe_serve.worker.reload, moe_serve.master.reload).

The file is checked here first (a ConfigError names the field: exit 2, nothing is asked).
Then every worker the file lists, then each master, gets a Reload call, one after the other:
a worker answers once the experts it newly holds serve, so by the time a master re-reads the
file their new holders already say they serve them, and traffic moves without a gap. A
worker that does not answer (not started yet) is skipped: it reads the file when it starts.
Each server re-reads its own copy of the file: on several machines, put the new file
everywhere first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from moe_serve.config import load_config
from moe_serve.tools.launcher import dial_address
from moe_serve.transport.auth import load_token, load_worker_token, metadata
from moe_serve.transport.tls import ClientTLS, channel
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc

# Codes meaning "nobody there" rather than "it refused".
_ABSENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _reload(
    address: str,
    stub: type[pb_grpc.MoEMasterStub] | type[pb_grpc.ExpertWorkerStub],
    tls: ClientTLS | None,
    md: tuple[tuple[str, str], ...] | None,
    timeout_s: float,
) -> tuple[grpc.StatusCode, str]:
    """(status code, the summary or the server's message) of one Reload call."""
    with channel(address, tls) as ch:
        try:
            reply = stub(ch).Reload(pb.ReloadRequest(), timeout=timeout_s, metadata=md)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, reply.summary


def reload_servers(config: Path, masters: list[str] | None, timeout_s: float) -> int:
    """Reload every worker of `config` (skipping those not running), then each master
    (`masters`, default: the config's master.listen); print each answer. Returns 0 when
    every master applied it, 1 when a server refused it or a master did not answer.
    ConfigError (exit 2) for a file that does not validate, before any call."""
    cfg = load_config(config)
    tls = ClientTLS.from_config(cfg.security.tls)
    worker_md = metadata(load_worker_token(cfg.security))
    client_md = metadata(load_token(cfg.security))
    failed = 0
    for w in cfg.workers:
        print(f"worker {w.id} at {w.address}: reloading", flush=True)
        code, text = _reload(w.address, pb_grpc.ExpertWorkerStub, tls, worker_md, timeout_s)
        if code == grpc.StatusCode.OK:
            print(f"worker {w.id}: {text}", flush=True)
        elif code in _ABSENT:
            print(f"worker {w.id}: not answering ({code.name}): skipped; it reads the file "
                  "when it starts", flush=True)  # fmt: skip
        else:
            failed += 1
            print(f"worker {w.id}: refused: {code.name}: {text}", flush=True)
    for address in masters or [dial_address(cfg.master.listen)]:
        print(f"master at {address}: reloading", flush=True)
        code, text = _reload(address, pb_grpc.MoEMasterStub, tls, client_md, timeout_s)
        if code == grpc.StatusCode.OK:
            print(f"master at {address}: {text}", flush=True)
        else:
            failed += 1
            print(f"master at {address}: refused: {code.name}: {text}", flush=True)
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    """`moe-serve reload --config FILE [--master HOST:PORT ...] [--timeout S]`."""
    return reload_servers(args.config, args.master, args.timeout)
