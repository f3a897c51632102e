"""A request whose result would not be finite fails alone with INVALID_ARGUMENT naming
`hidden`; its batch mates are answered as if it had never come; no reply is OK with NaN/Inf.

Real `moe-serve up` processes: the master merges concurrent Infer calls into one Forward
per worker, which is where one poisoned row used to fail everyone's call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.weights import SyntheticWeights
from tests.conftest import Cluster, world
from tests.test_metrics import scrape, total

TOL = 1e-5
GOOD_CALLS = 12
ROUNDS = 20
WINDOW_US = 20_000  # calls sent together meet in one master batch
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# dtype -> (scale of a row aligned with router row 0, the start of the message's cause).
# float32: +-1e38 is finite, but 64 aligned products of 1e38 x ~0.06 make a gate logit of
# ~4e38 > 3.4e38 (inf), softmax NaN. float16: +-60000 is finite and so is the gate (float32),
# but the experts overflow 65504.
CASES = {
    "float32": (1e38, "gate scores not finite"),
    "float16": (6e4, "output not finite"),
}


@pytest.fixture(scope="module")
def clusters(in_process_factory: Any) -> Callable[[str], Cluster]:
    """One cluster per model dtype, started on first use."""
    started: dict[str, Cluster] = {}

    def get(dtype: str) -> Cluster:
        if dtype not in started:
            config = world(model={"dtype": dtype}, master={"batch_delay_us": WINDOW_US})
            started[dtype] = in_process_factory(config)
        return started[dtype]

    return get


def _poison(cluster: Cluster, scale: float, rows: int = 3) -> torch.Tensor:
    """Rows aligned with router row 0, `scale` in magnitude; row 0 is fine (0.5), so that
    the message names row 1, the first bad one."""
    router = SyntheticWeights(cluster.cfg.model, cluster.cfg.routing).router(0)
    poison = (scale * torch.sign(router[0])).repeat(rows, 1)
    poison[0] = 0.5
    return poison.to(getattr(torch, cluster.cfg.model.dtype))


def _good(cluster: Cluster, i: int) -> torch.Tensor:
    dtype = getattr(torch, cluster.cfg.model.dtype)
    return torch.randn(1 + i, 64, generator=torch.Generator().manual_seed(i)).to(dtype)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("dtype", sorted(CASES))
def test_poisoned_row_alone_is_invalid_argument_never_ok(
    clusters: Callable[[str], Cluster], dtype: str
) -> None:
    cluster, (scale, phrase) = clusters(dtype), CASES[dtype]
    poison = _poison(cluster, scale)
    with MoEClient(cluster.address) as client, pytest.raises(MoEServeError) as err:
        client.infer(poison)
    assert err.value.code == INVALID
    assert err.value.message.startswith(f"hidden: row 1: {phrase}"), err.value.message


@pytest.mark.parametrize("dtype", sorted(CASES))
def test_poisoned_row_fails_alone_while_12_concurrent_good_calls_match_their_quiet_answers(
    clusters: Callable[[str], Cluster], dtype: str
) -> None:
    cluster, (scale, phrase) = clusters(dtype), CASES[dtype]
    poison = _poison(cluster, scale)
    goods = [_good(cluster, i) for i in range(GOOD_CALLS)]
    clients = [MoEClient(cluster.address) for _ in range(GOOD_CALLS + 1)]
    try:
        quiet = [clients[0].infer(x) for x in goods]
        ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)
        refs = [ref.forward(x, 0)[0] for x in goods]
        assert max(_max_err(q, r) for q, r in zip(quiet, refs, strict=True)) <= 1e-2
        before = scrape(cluster.metrics_url())
        start = threading.Barrier(GOOD_CALLS + 1)

        def call(i: int) -> torch.Tensor | MoEServeError:
            start.wait()
            try:
                return clients[i].infer(poison if i == GOOD_CALLS else goods[i])
            except MoEServeError as exc:
                return exc

        good_errs: list[float | str] = []
        poisoned: list[str] = []
        with ThreadPoolExecutor(GOOD_CALLS + 1) as pool:
            for _ in range(ROUNDS):
                *results, bad = pool.map(call, range(GOOD_CALLS + 1))
                for want, got in zip(quiet, results, strict=True):
                    ok = isinstance(got, torch.Tensor)
                    good_errs.append(
                        _max_err(got, want) if ok else f"{got.code.name}: {got.message}"
                    )
                poisoned.append(
                    f"{bad.code.name}: {bad.message}"
                    if isinstance(bad, MoEServeError)
                    else f"OK, finite: {bool(torch.isfinite(bad).all())}"
                )
        after = scrape(cluster.metrics_url())
    finally:
        for c in clients:
            c.close()
    failed = [e for e in good_errs if isinstance(e, str) or e > TOL]
    assert len(good_errs) == GOOD_CALLS * ROUNDS and failed == [], failed[:3]
    want = f"INVALID_ARGUMENT: hidden: row 1: {phrase}"
    assert all(p.startswith(want) for p in poisoned), poisoned[:3]
    # The poisoned call did share passes with good ones: 13 calls a round, in at most 6.
    name = "moe_serve_master_batch_requests"
    passes = total(after, f"{name}_count") - total(before, f"{name}_count")
    assert passes <= 6 * ROUNDS
    assert cluster.running()
    with MoEClient(cluster.address) as client:  # still serving
        assert _max_err(client.infer(goods[0]), quiet[0]) <= TOL


def test_output_overflow_fails_only_its_own_call_in_a_batch(
    clusters: Callable[[str], Cluster],
) -> None:
    cluster = clusters("float16")
    overflow = torch.cat([_poison(cluster, 6e4, rows=2)[1:], _good(cluster, 0)])  # row 0 bad
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)
    _, routing = ref.forward(overflow, 0)
    assert torch.isfinite(routing.weights).all()  # the gate is fine; the experts overflow
    xs = [_good(cluster, 3), overflow, _good(cluster, 4)]

    async def together() -> list[Any]:
        async with AsyncMoEClient(cluster.address) as client:
            return await asyncio.gather(*(client.infer(x) for x in xs), return_exceptions=True)

    with MoEClient(cluster.address) as client:
        quiet = [client.infer(xs[0]), client.infer(xs[2])]
    first, bad, last = asyncio.run(together())
    assert isinstance(bad, MoEServeError) and bad.code == INVALID
    assert bad.message.startswith("hidden: row 0: output not finite"), bad.message
    assert "float16" in bad.message
    assert _max_err(first, quiet[0]) <= TOL and _max_err(last, quiet[1]) <= TOL
