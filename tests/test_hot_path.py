"""The per-call path's shortcuts give what the general path gives: cached metric children
count into the same series, a lone Forward call computes what a merged batch computes for
it, and small calls are checked on the host with the tensor checks' messages."""

from __future__ import annotations

import pytest
import torch

from moe_serve.config import parse_config
from moe_serve.errors import InvalidRequestError
from moe_serve.metrics import Children, MasterMetrics
from moe_serve.weights import open_weights
from moe_serve.worker.engine import HOST_CHECK_PAIRS, WorkerEngine
from tests.conftest import world


def test_cached_children_count_into_the_labelled_series() -> None:
    m = MasterMetrics()
    requests = Children(m.requests)
    requests("0", "OK").inc()
    requests("0", "OK").inc(2)
    requests("invalid", "INVALID_ARGUMENT").inc()
    assert requests("0", "OK") is requests("0", "OK")
    assert m.requests.labels("0", "OK")._value.get() == 3
    assert m.requests.labels("invalid", "INVALID_ARGUMENT")._value.get() == 1


def _engine() -> WorkerEngine:
    cfg = parse_config(world())
    return WorkerEngine(cfg.model, cfg.workers[0], open_weights(cfg.model, cfg.routing))


def _pairs(tokens: list[int], experts: list[int], weights: list[float]) -> tuple:
    return (
        torch.tensor(tokens, dtype=torch.int32),
        torch.tensor(experts, dtype=torch.int32),
        torch.tensor(weights, dtype=torch.float32),
    )


@pytest.mark.parametrize(
    ("pairs", "field", "message"),
    [
        (([0, 20], [0, 1], [0.5, 0.5]), "pair_token", "values must be in [0, 20)"),
        (([0, -1], [0, 1], [0.5, 0.5]), "pair_token", "values must be in [0, 20)"),
        (([0, 1], [0, 8], [0.5, 0.5]), "pair_expert", "values must be in [0, 8)"),
        (([0, 1], [0, 5], [0.5, 0.5]), "pair_expert", "not held by worker 'w0'"),
        (([0, 1], [0, 1], [0.5, float("nan")]), "pair_weight", "contains NaN or Inf"),
        (([0, 1], [0, 1], [float("inf"), 0.5]), "pair_weight", "contains NaN or Inf"),
    ],
)
def test_small_calls_are_refused_on_the_host_as_on_the_device(
    pairs: tuple, field: str, message: str
) -> None:
    engine = _engine()
    small = _pairs(*pairs)
    # The same pairs padded past HOST_CHECK_PAIRS take the tensor checks.
    n = HOST_CHECK_PAIRS + 1 - len(pairs[0])
    large = _pairs([0] * n + pairs[0], [0] * n + pairs[1], [0.1] * n + pairs[2])
    errors = []
    for token, expert, weight in (small, large):
        with pytest.raises(InvalidRequestError) as info:
            engine.validate(0, 20, token, expert, weight)  # 20 rows x 4 held: up to 80 pairs
        errors.append(str(info.value))
    assert field in errors[0] and message in errors[0]
    assert errors[0] == errors[1]


def test_valid_small_calls_pass_the_host_checks() -> None:
    engine = _engine()
    engine.validate(0, 2, *_pairs([0, 1, 1], [0, 3, 2], [0.5, 0.25, 0.25]))
