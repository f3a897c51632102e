"""The batching loop master and worker share (moe_serve.batching): which calls run together,
what a failure reaches, and that stopping leaves no call waiting. In-process, no servers:
each call is a number, and a pass answers call n with 10 * n."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from moe_serve.batching import Batcher, TokenBudget
from moe_serve.errors import DrainingError, InvalidRequestError, MoEError, Reason

WINDOW_S = 0.2  # long enough that calls sent 10 ms apart always meet in one batch


class Passes:
    """Runs passes, recording (layer, calls) of each; a pass of `fail_layer` raises, and a
    call numbered `bad` gets its own error. Each pass first waits for `gate`, if set."""

    def __init__(self, fail_layer: int | None = None, bad: int | None = None) -> None:
        self.fail_layer, self.bad = fail_layer, bad
        self.seen: list[tuple[int, list[int]]] = []
        self.gate: asyncio.Event | None = None

    async def run(self, layer: int, calls: list[int]) -> Sequence[int | MoEError]:
        self.seen.append((layer, calls))
        if self.gate is not None:
            await self.gate.wait()
        if layer == self.fail_layer:
            raise RuntimeError(f"pass of layer {layer} failed")
        return [InvalidRequestError("x", "bad row") if c == self.bad else 10 * c for c in calls]


def batcher(
    passes: Passes,
    window_s: float = 0.0,
    max_batch_tokens: int = 1000,
    max_in_flight: int | None = None,
) -> Batcher[int, int]:
    budget = TokenBudget(10_000, "test.max_pending_tokens", "test server")
    return Batcher(passes.run, budget, window_s, max_batch_tokens, max_in_flight)


async def send(b: Batcher[int, int], calls: list[int], layers: list[int] | None = None) -> list:
    layers = layers or [0] * len(calls)
    coros = (b.submit(c, layer, tokens=1) for c, layer in zip(calls, layers, strict=True))
    return await asyncio.gather(*coros, return_exceptions=True)


def test_calls_arriving_within_the_window_run_as_one_pass() -> None:
    async def scenario() -> tuple[list, list]:
        passes = Passes()
        b = batcher(passes, window_s=WINDOW_S)
        b.start()
        first = asyncio.create_task(send(b, [1]))
        await asyncio.sleep(0.01)  # the first call's window is open
        rest = await send(b, [2, 3, 4])
        results = [*await first, *rest]
        await b.stop()
        return passes.seen, results

    seen, results = asyncio.run(scenario())
    assert seen == [(0, [1, 2, 3, 4])]  # one pass, not two
    assert results == [10, 20, 30, 40]


def test_with_no_window_a_lone_call_leaves_at_once() -> None:
    async def scenario() -> list[tuple[int, list[int]]]:
        passes = Passes()
        b = batcher(passes, window_s=0.0)
        b.start()
        first = asyncio.create_task(send(b, [1]))
        await asyncio.sleep(0.01)
        await send(b, [2, 3, 4])
        await first
        await b.stop()
        return passes.seen

    assert asyncio.run(scenario()) == [(0, [1]), (0, [2, 3, 4])]


def test_a_call_of_another_layer_runs_in_its_own_pass() -> None:
    async def scenario() -> tuple[list, list]:
        passes = Passes()
        b = batcher(passes, window_s=WINDOW_S)
        b.start()
        results = await send(b, [1, 2, 3, 4], layers=[3, 0, 3, 0])
        await b.stop()
        return passes.seen, results

    seen, results = asyncio.run(scenario())
    assert seen == [(0, [2, 4]), (3, [1, 3])]  # one pass per layer, in layer order
    assert results == [10, 20, 30, 40]


def test_max_batch_tokens_caps_a_batch_and_the_call_that_does_not_fit_opens_the_next() -> None:
    async def scenario() -> list[tuple[int, list[int]]]:
        passes = Passes()
        b = batcher(passes, window_s=WINDOW_S, max_batch_tokens=8)
        b.start()
        # 3 tokens each: two make 6, a third would make 9 > 8.
        await asyncio.gather(*(b.submit(c, 0, tokens=3) for c in range(1, 6)))
        await b.submit(9, 0, tokens=20)  # larger than the cap: runs alone all the same
        await b.stop()
        return passes.seen

    assert asyncio.run(scenario()) == [(0, [1, 2]), (0, [3, 4]), (0, [5]), (0, [9])]


def test_a_call_whose_caller_gave_up_is_not_run() -> None:
    async def scenario() -> list[tuple[int, list[int]]]:
        passes = Passes()
        b = batcher(passes, window_s=WINDOW_S)
        b.start()
        calls = [asyncio.create_task(b.submit(c, 0, tokens=1)) for c in (1, 2, 3)]
        await asyncio.sleep(0.01)  # all three queued, the window still open
        calls[1].cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await b.stop()
        return passes.seen

    assert asyncio.run(scenario()) == [(0, [1, 3])]


def test_a_failing_pass_fails_only_its_own_calls() -> None:
    async def scenario() -> list:
        b = batcher(Passes(fail_layer=1), window_s=WINDOW_S)
        b.start()
        results = await send(b, [1, 2, 3, 4], layers=[0, 1, 0, 1])
        await b.stop()
        return results

    results = asyncio.run(scenario())
    assert results[0] == 10 and results[2] == 30  # the layer-0 pass of the same batch
    assert [str(r) for r in results[1::2]] == ["pass of layer 1 failed"] * 2


def test_a_calls_own_error_fails_it_alone_and_its_mates_get_their_results() -> None:
    async def scenario() -> tuple[list, list]:
        passes = Passes(bad=2)
        b = batcher(passes, window_s=WINDOW_S)
        b.start()
        results = await send(b, [1, 2, 3])
        await b.stop()
        return passes.seen, results

    seen, results = asyncio.run(scenario())
    assert seen == [(0, [1, 2, 3])]
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], InvalidRequestError)


@pytest.mark.parametrize("max_in_flight", [None, 1], ids=["inline", "tasks"])
def test_stop_finishes_the_running_batch_and_fails_queued_calls_as_draining(
    max_in_flight: int | None,
) -> None:
    async def scenario() -> tuple[list, list, BaseException]:
        passes = Passes()
        passes.gate = asyncio.Event()
        b = batcher(passes, max_in_flight=max_in_flight)
        b.start()
        running = asyncio.create_task(send(b, [1]))
        await asyncio.sleep(0.01)  # call 1's pass has started and waits on the gate
        queued = asyncio.create_task(send(b, [2, 3]))
        await asyncio.sleep(0.01)  # calls 2 and 3 wait for the next batch
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.01)
        passes.gate.set()
        await asyncio.wait_for(stopping, 5)  # no call left waiting: stop returns
        results = await asyncio.wait_for(asyncio.gather(running, queued), 5)
        with pytest.raises(DrainingError) as late:
            await b.submit(4, 0, tokens=1)
        return passes.seen, results, late.value

    seen, (ran, refused), late = asyncio.run(scenario())
    assert seen == [(0, [1])]
    assert ran == [10]
    assert all(isinstance(r, DrainingError) for r in refused), refused
    for error in [*refused, late]:
        assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == Reason.DRAINING
        assert "test server is draining (shutting down) and did not run the call" in str(error)


def test_stop_fails_calls_of_a_batch_still_gathering() -> None:
    async def scenario() -> list:
        passes = Passes()
        b = batcher(passes, window_s=10.0)  # the window would hold the batch for 10 s
        b.start()
        calls = asyncio.create_task(send(b, [1, 2]))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(b.stop(), 5)
        results = await asyncio.wait_for(calls, 5)
        assert passes.seen == []
        return results

    assert all(isinstance(r, DrainingError) for r in asyncio.run(scenario()))
