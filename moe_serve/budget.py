"""Admission by token budget: how master and workers bound what they hold under overload."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from moe_serve.errors import RequestTooLargeError


class TokenBudget:
    """Units (tokens on the master; max(tokens, pairs) per call on a worker) admitted and not
    yet answered, at most `limit` (the config key `key`).

    A call that would go beyond it is refused with RESOURCE_EXHAUSTED at once, so memory
    stays bounded; a call that finds nothing held always gets in, however large (the
    request-size limits bound that one).
    """

    def __init__(self, limit: int, key: str, holder: str, unit: str = "tokens") -> None:
        self.limit, self.key, self.holder, self.unit = limit, key, holder, unit
        self.held = 0

    @contextmanager
    def admit(self, tokens: int) -> Iterator[None]:
        """Hold `tokens` units for the duration of the block; RequestTooLargeError if over."""
        if self.held > 0 and self.held + tokens > self.limit:
            raise RequestTooLargeError(
                f"{self.holder} is over {self.key}={self.limit}: {self.held} {self.unit} "
                f"held, {tokens} more asked; retry later"
            )
        self.held += tokens
        try:
            yield
        finally:
            self.held -= tokens
