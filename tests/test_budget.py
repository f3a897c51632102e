"""Token budgets: what is admitted, what is refused, and that refusals free nothing."""

from __future__ import annotations

import pytest

from moe_serve.budget import TokenBudget
from moe_serve.errors import RequestTooLargeError


def test_calls_within_the_limit_are_admitted_and_released() -> None:
    budget = TokenBudget(10, "master.max_pending_tokens", "master")
    with budget.admit(4), budget.admit(6):
        assert budget.held == 10
    assert budget.held == 0


def test_a_call_beyond_the_limit_is_refused_naming_the_key_and_holds_nothing() -> None:
    budget = TokenBudget(10, "batching.max_queue_tokens", "worker")
    with budget.admit(8):
        with pytest.raises(RequestTooLargeError) as err, budget.admit(3):
            pass
        assert budget.held == 8
    assert "worker is over batching.max_queue_tokens=10: 8 tokens held, 3 more asked" in str(
        err.value
    )
    assert budget.held == 0


def test_a_lone_call_larger_than_the_limit_still_runs() -> None:
    budget = TokenBudget(10, "master.max_pending_tokens", "master")
    with budget.admit(50):
        assert budget.held == 50
