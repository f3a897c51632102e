"""Attacks on the shared-memory fast path, each against a real `moe-serve up` cluster.

A region is a capability of the connection that attached it: an id alone grants nothing,
only the owner's Unix user can map a region, its size is pinned for its lifetime, no
connection can push another off the fast path, and start-up survives anything in /dev/shm.
Each attack gets a clear status (or attached=False) while the victim keeps its exact
answers. The second-user attacker is `nobody` (uid 65534) holding only grpcio and the
generated stubs: a root process that imports them, then drops to uid 65534 for good.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import MoEClient
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.transport.shm import ALIGN, SharedRegion
from moe_serve.transport.wire import tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from tests.conftest import Cluster, ProcessCluster, alive, world
from tests.test_metrics import scrape, total

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")
NOBODY = 65534
FP32_TOL = 1e-5
BIG = 4096  # 4096 x 64 float32 = 1 MiB: each worker's slice goes through shared memory
H = 64
as_nobody_needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the attacker runs as a second Unix user (nobody, uid 65534): switching needs root",
)

PRELUDE = f"""
import fcntl, json, os, struct, sys
import grpc
sys.path.insert(0, {str(ROOT)!r})
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
# grpc imports its channel code on first use: use it once while the files are readable.
with grpc.insecure_channel("127.0.0.1:1") as warm:
    try:
        pb_grpc.MoEMasterStub(warm).GetInfo(pb.GetInfoRequest(), timeout=0.01)
    except grpc.RpcError:
        pass
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
assert (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == ({NOBODY},) * 4
arg = json.loads(sys.argv[1])

def out(**kw):
    print(json.dumps(kw), flush=True)

def call(method, request):
    try:
        return "OK", method(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()

def attached(stub, request):
    code, reply = call(stub.AttachRegion, request)
    return (code, reply.attached, reply.reason) if code == "OK" else (code, False, reply)

def sealed_memfd(size, mode, nonce):
    fd = os.memfd_create("moe_serve-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.fchmod(fd, mode)
    os.ftruncate(fd, size)
    os.pwrite(fd, nonce, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd
"""


def as_nobody(script: str, **arg: Any) -> list[dict[str, Any]]:
    """Run `script` as uid 65534 after PRELUDE; its `out(...)` lines, parsed."""
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script), json.dumps(arg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def pids(cluster: ProcessCluster) -> dict[str, int]:
    """{"master": pid, "worker w0": pid, ...}: the cluster's child processes."""
    return {name: proc.pid for name, proc in cluster.procs.items()}


def dead_pid() -> int:
    """The pid of a process that has exited (as a region of another PID namespace looks)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


@pytest.fixture(scope="module")
def junk() -> Iterator[list[Path]]:
    """What a /dev/shm may hold before start-up: names whose pid overflows a C long, another
    user's leftover, and a region of a pid that is not alive here (in a container with its
    own PID namespace sharing /dev/shm, it may be someone's live region)."""
    tag = os.urandom(8).hex()
    files = [
        SHM / "moe_serve-99999999999999999999-x",
        SHM / f"moe_serve-99999999999999999999-{tag}",
        SHM / f"moe_serve-{dead_pid()}-{os.urandom(8).hex()}",  # another user's
        SHM / f"moe_serve-{dead_pid()}-{os.urandom(8).hex()}",  # ours, pid not here
    ]
    for f in files:
        f.write_bytes(bytes(4096))
    if os.geteuid() == 0:
        os.chown(files[2], NOBODY, NOBODY)
    yield files
    for f in files:
        f.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster(cluster_factory: Any, junk: list[Path]) -> Cluster:
    return cluster_factory(world())


@pytest.fixture(scope="module")
def ref(cluster: Cluster) -> ReferenceMoE:
    return ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed))


def shared_calls(cluster: Cluster) -> tuple[float, float]:
    """(client Infers through shared memory, worker calls through shared memory) so far."""
    samples = scrape(cluster.metrics_url())
    return (
        total(samples, "moe_serve_master_infer_transport_total", transport="shared"),
        total(samples, "moe_serve_worker_calls_total", transport="shared"),
    )


def assert_serves_exactly(cluster: Cluster, ref: ReferenceMoE, seed: int) -> None:
    """A fresh client's large request comes back exact, through shared memory both hops."""
    x = _x(BIG, seed)
    before = shared_calls(cluster)
    with MoEClient(cluster.address) as client:
        y = client.infer(x)
    expected, _ = ref.forward(x, 0)
    assert (y - expected).abs().max().item() <= FP32_TOL
    after = shared_calls(cluster)
    assert after[0] - before[0] == 1  # the client's region
    assert after[1] - before[1] == 2  # the master's region, on both workers
    assert all(alive(pid) for pid in pids(cluster).values())


def fd_links(pid: int) -> list[str]:
    """What each open descriptor of `pid` names (/proc/<pid>/fd/* links)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def master_stub(cluster: Cluster) -> tuple[grpc.Channel, pb_grpc.MoEMasterStub]:
    channel = grpc.insecure_channel(cluster.address)
    return channel, pb_grpc.MoEMasterStub(channel)


def worker_address(cluster: Cluster, index: int) -> str:
    return cluster.cfg.workers[index].address


# ------------------------------------------------------------------- start-up ---


def test_start_up_survives_any_dev_shm_and_deletes_none_of_it(
    cluster: Cluster, ref: ReferenceMoE, junk: list[Path]
) -> None:
    assert_serves_exactly(cluster, ref, seed=1)
    assert [f.exists() for f in junk] == [True] * len(junk)


def test_regions_are_no_files_and_their_ids_appear_in_no_name(cluster: Cluster) -> None:
    before = set(os.listdir(SHM))
    with MoEClient(cluster.address) as client:
        client.infer(_x(BIG, 2))
        region = client._shared.region
        assert region is not None
        assert len(region.id) == 32  # 128 random bits
        assert set(os.listdir(SHM)) == before
        links = [link for pid in [os.getpid(), *pids(cluster).values()] for link in fd_links(pid)]
        assert not [link for link in links if region.id in link]
        assert any("memfd:moe_serve-region" in link for link in links)


# ------------------------------------------------------------ id as capability ---


@as_nobody_needs_root
def test_infer_naming_another_clients_region_neither_reads_nor_writes_it(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    with MoEClient(cluster.address) as victim:
        victim.infer(_x(BIG, 3))
        region = victim._shared.region
        assert region is not None and victim._shared.state == "attached"
        region.memory[ALIGN : ALIGN + (4 << 20)] = 0x5A  # a secret the attacker must not get
        before = region.memory[: 8 << 20].clone()
        results = as_nobody(
            """
            stub = pb_grpc.MoEMasterStub(grpc.insecure_channel(arg["address"]))
            shape = [arg["tokens"], arg["hidden"]]
            read = pb.InferRequest(
                layer=0,
                hidden_shared=pb.SharedTensor(
                    region=arg["id"], offset=arg["offset"], dtype=pb.DTYPE_FLOAT32, shape=shape
                ),
            )
            code, details = call(stub.Infer, read)
            out(attack="read", result=code, details=str(details))
            write = pb.InferRequest(
                layer=0,
                hidden=pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32, shape=shape, data=bytes(4 * shape[0] * shape[1])
                ),
                output_shared=pb.SharedTensor(
                    region=arg["id"], offset=arg["offset"], dtype=pb.DTYPE_FLOAT32, shape=shape
                ),
            )
            code, details = call(stub.Infer, write)
            out(attack="write", result=code, details=str(details))
            """,
            address=cluster.address,
            id=region.id,
            offset=ALIGN,
            tokens=BIG,
            hidden=H,
        )
        for r in results:
            assert r["result"] == "FAILED_PRECONDITION", r
            assert "not mapped for this connection" in r["details"]
        assert torch.equal(region.memory[: 8 << 20], before)
        x = _x(BIG, 4)
        y = victim.infer(x)
        expected, _ = ref.forward(x, 0)
        assert (y - expected).abs().max().item() <= FP32_TOL


@as_nobody_needs_root
def test_attach_with_no_or_a_guessed_nonce_maps_nothing(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    results = as_nobody(
        """
        targets = {"master": pb_grpc.MoEMasterStub(grpc.insecure_channel(arg["master"]))}
        for i, address in enumerate(arg["workers"]):
            targets[f"w{i}"] = pb_grpc.ExpertWorkerStub(grpc.insecure_channel(address))
        for name, stub in targets.items():
            for fd in range(64):  # every descriptor the master may hold its region in
                for nonce in (b"", os.urandom(16)):
                    request = pb.AttachRegionRequest(
                        id=os.urandom(16).hex(), size=1 << 20, nonce=nonce,
                        host=pb.HostRegion(pid=arg["pid"], fd=fd),
                    )
                    code, ok, reason = attached(stub, request)
                    out(target=name, fd=fd, nonce=len(nonce), code=code, attached=ok, reason=reason)
        """,
        master=cluster.address,
        workers=[worker_address(cluster, i) for i in range(2)],
        pid=pids(cluster)["master"],
    )
    assert len(results) == 3 * 64 * 2
    assert [r for r in results if r["attached"]] == []
    assert all("nonce: 0 bytes" in r["reason"] for r in results if r["nonce"] == 0)
    assert_serves_exactly(cluster, ref, seed=5)


@as_nobody_needs_root
def test_region_of_another_user_is_refused_by_master_and_workers(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    results = as_nobody(
        """
        nonce = os.urandom(32)
        garbage = struct.pack("<f", 3.0) * ((1 << 20) // 4)
        offers = {}
        for mode in (0o600, 0o666):  # sealed memfds of this user
            fd = sealed_memfd(1 << 20, mode, nonce)
            os.pwrite(fd, garbage[ALIGN:], ALIGN)
            offers[f"memfd {mode:o}"] = fd
        path = f"/dev/shm/moe_serve-{os.getpid()}-{os.urandom(8).hex()}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)  # the old attack
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, nonce, 0)
        offers["dev/shm 666"] = fd
        stubs = {"master": pb_grpc.MoEMasterStub(grpc.insecure_channel(arg["master"]))}
        for i, address in enumerate(arg["workers"]):
            stubs[f"w{i}"] = pb_grpc.ExpertWorkerStub(grpc.insecure_channel(address))
        for name, stub in stubs.items():
            for kind, fd in offers.items():
                request = pb.AttachRegionRequest(
                    id=os.urandom(16).hex(), size=1 << 20, nonce=nonce,
                    host=pb.HostRegion(pid=os.getpid(), fd=fd),
                )
                code, ok, reason = attached(stub, request)
                out(target=name, kind=kind, code=code, attached=ok, reason=reason)
        os.unlink(path)
        """.replace("ALIGN", str(ALIGN)),
        master=cluster.address,
        workers=[worker_address(cluster, i) for i in range(2)],
    )
    assert len(results) == 3 * 3
    assert [r for r in results if r["attached"]] == []
    # Refused by the peer's own check of the file's owner (a worker credential, where one is
    # required, refuses the attacker's call even earlier).
    answered = [r for r in results if r["code"] == "OK"]
    assert [r["target"] for r in answered][:3] == ["master"] * 3
    assert all("owned by uid 65534" in r["reason"] for r in answered), answered
    assert_serves_exactly(cluster, ref, seed=6)


def test_another_connections_region_never_replaces_the_masters_on_a_worker(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    impostor = SharedRegion(1 << 20, torch.device("cpu"))
    try:
        impostor.view(ALIGN, torch.float32, (((1 << 20) - ALIGN) // 4,)).fill_(3.0)
        for i in range(2):
            with grpc.insecure_channel(worker_address(cluster, i)) as channel:
                reply = pb_grpc.ExpertWorkerStub(channel).AttachRegion(
                    impostor.description(), timeout=10
                )
            assert reply.attached  # same user: its own binding, on its own connection
        assert_serves_exactly(cluster, ref, seed=7)
    finally:
        impostor.close()


# ----------------------------------------------------------------- pinned size ---


def test_attached_region_cannot_shrink_so_reading_it_cannot_kill_the_master(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    region = SharedRegion(1 << 20, torch.device("cpu"))
    channel, stub = master_stub(cluster)
    try:
        assert stub.AttachRegion(region.description(), timeout=10).attached
        fd = region.description().host.fd
        x = _x(16, 8)
        region.view(4096, torch.float32, (16, H)).copy_(x)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(reopened, 0)
        finally:
            os.close(reopened)
        reply = stub.Infer(
            pb.InferRequest(layer=0, hidden_shared=region.shared(4096, torch.float32, (16, H))),
            timeout=10,
        )
        expected, _ = ref.forward(x, 0)
        y = tensor_from_pb(reply.output, "output")
        assert (y - expected).abs().max().item() <= FP32_TOL
        assert alive(pids(cluster)["master"])
    finally:
        channel.close()
        region.close()


def _unsealed_memfd(size: int, nonce: bytes) -> int:
    fd = os.memfd_create("moe_serve-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, size)
    os.pwrite(fd, nonce, 0)
    return fd


def test_truncatable_file_is_refused_and_truncating_it_kills_nothing(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    nonce, region_id = os.urandom(32), os.urandom(16).hex()
    fd = _unsealed_memfd(1 << 20, nonce)
    offer = pb.AttachRegionRequest(
        id=region_id, size=1 << 20, nonce=nonce, host=pb.HostRegion(pid=os.getpid(), fd=fd)
    )
    shared = pb.SharedTensor(region=region_id, offset=4096, dtype=pb.DTYPE_FLOAT32, shape=[16, H])
    pairs = {
        "pair_token": pb.Tensor(dtype=pb.DTYPE_INT32, shape=[1], data=bytes(4)),
        "pair_expert": pb.Tensor(dtype=pb.DTYPE_INT32, shape=[1], data=bytes(4)),  # expert 0
        "pair_weight": pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes(4)),
    }
    try:
        with (
            grpc.insecure_channel(cluster.address) as to_master,
            grpc.insecure_channel(worker_address(cluster, 0)) as to_worker,
        ):
            master, worker = pb_grpc.MoEMasterStub(to_master), pb_grpc.ExpertWorkerStub(to_worker)
            for stub in (master, worker):
                reply = stub.AttachRegion(offer, timeout=10)
                assert not reply.attached
                assert "not sealed" in reply.reason
            os.ftruncate(fd, 0)  # the attack: SIGBUS for whoever reads at offset 4096
            calls = [
                (master.Infer, pb.InferRequest(layer=0, hidden_shared=shared)),
                (worker.Forward, pb.ForwardRequest(layer=0, hidden_shared=shared, **pairs)),
            ]
            for method, request in calls:
                with pytest.raises(grpc.RpcError) as err:
                    method(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "not mapped for this connection" in (err.value.details() or "")
    finally:
        os.close(fd)
    assert_serves_exactly(cluster, ref, seed=9)


# ---------------------------------------------------------------------- caps ---

CROWD = """
import sys, grpc, torch
from moe_serve.transport.shm import SharedRegion
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
replies = []
regions = [SharedRegion(64 << 10, torch.device("cpu")) for _ in range(int(sys.argv[2]))]
# One connection each, as so many client processes would have.
own = [("grpc.use_local_subchannel_pool", 1)]
channels = [grpc.insecure_channel(sys.argv[1], options=own) for _ in regions]
for region, channel in zip(regions, channels):
    reply = pb_grpc.MoEMasterStub(channel).AttachRegion(region.description(), timeout=10)
    print(int(reply.attached), reply.reason, flush=True)
"""


def test_a_crowd_of_connections_cannot_push_a_busy_client_off_shared_memory(
    cluster: Cluster, ref: ReferenceMoE
) -> None:
    with MoEClient(cluster.address) as victim:
        victim.infer(_x(BIG, 10))  # attached, and used just now
        crowd = subprocess.run(
            [sys.executable, "-c", CROWD, cluster.address, "70"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        replies = [line.split(" ", 1) for line in crowd.stdout.splitlines()]
        assert len(replies) == 70
        refused = [reason for ok, reason in replies if ok == "0"]
        assert 6 <= len(refused) < 70  # 64 regions at most, some held by earlier clients
        assert all("holds 64 regions of other connections" in r for r in refused)
        name = "moe_serve_master_infer_transport_total"
        before = total(scrape(cluster.metrics_url()), name, transport="shared")
        x = _x(BIG, 11)
        y = victim.infer(x)
        expected, _ = ref.forward(x, 0)
        assert (y - expected).abs().max().item() <= FP32_TOL
        assert total(scrape(cluster.metrics_url()), name, transport="shared") - before == 1
    # The crowd has exited: its regions make room for a newcomer at its attach.
    assert_serves_exactly(cluster, ref, seed=12)


def test_one_connection_keeps_only_its_four_most_recent_regions(cluster: Cluster) -> None:
    regions = [SharedRegion(64 << 10, torch.device("cpu")) for _ in range(6)]
    channel, stub = master_stub(cluster)
    try:
        for r in regions:
            assert stub.AttachRegion(r.description(), timeout=10).attached
        codes = []
        for r in regions:
            request = pb.InferRequest(layer=0, hidden_shared=r.shared(ALIGN, torch.float32, (4, H)))
            try:
                stub.Infer(request, timeout=10)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes == ["FAILED_PRECONDITION"] * 2 + ["OK"] * 4
    finally:
        channel.close()
        for r in regions:
            r.close()


# ------------------------------------------------------------ copy before check ---


def test_shared_input_rewritten_during_calls_never_comes_back_ok_with_nan(
    cluster: Cluster,
) -> None:
    region = SharedRegion(4 << 20, torch.device("cpu"))
    channel, stub = master_stub(cluster)
    block = region.view(ALIGN, torch.float32, (BIG, H))
    x = _x(BIG, 13)
    block.copy_(x)
    stop = threading.Event()

    def flip() -> None:  # the client's own rewriting of its input while the master reads it
        while not stop.is_set():
            block[::7].fill_(float("nan"))
            block.copy_(x)

    flipper = threading.Thread(target=flip)
    try:
        assert stub.AttachRegion(region.description(), timeout=10).attached
        flipper.start()
        request = pb.InferRequest(
            layer=0, hidden_shared=region.shared(ALIGN, torch.float32, (BIG, H))
        )
        outcomes = []
        for _ in range(30):
            try:
                reply = stub.Infer(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
                assert (exc.details() or "").startswith("hidden")
                outcomes.append("INVALID_ARGUMENT")
                continue
            y = tensor_from_pb(reply.output, "output")
            assert bool(torch.isfinite(y).all()), "OK with a non-finite output"
            outcomes.append("OK")
        assert len(outcomes) == 30
        assert alive(pids(cluster)["master"])
    finally:
        stop.set()
        if flipper.is_alive():
            flipper.join()
        channel.close()
        region.close()
