"""Token bucket per API key, in this process's memory.

A key may send `burst` requests at once and `rate_per_s` a second on average. The state
is per gateway process: with N replicas behind a load balancer a key gets up to N times
its budget, so a multi-replica deployment either divides the budget per replica or moves
the buckets to Redis (docs/gateway.md). It must never block or fail a request for any
reason but an empty bucket.

Headers (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Limit` (the burst),
`RateLimit-Remaining` (whole requests left now), `RateLimit-Reset` (seconds until the
bucket is full again); on a refusal also `Retry-After` (seconds until one token).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class TokenBucketLimiter:
    def __init__(self, *, rate_per_s: float, burst: int, max_buckets: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate = rate_per_s
        self.burst = burst
        self.max_buckets = max_buckets
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, at]

    def take(self, key: str) -> Decision:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._forget_full(now)
            bucket = self._buckets[key] = [float(self.burst), now]
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        bucket[0], bucket[1] = tokens, now
        return Decision(
            allowed=allowed,
            limit=self.burst,
            remaining=int(tokens),
            reset_s=math.ceil((self.burst - tokens) / self.rate),
            retry_after_s=0 if allowed else max(1, math.ceil((1.0 - tokens) / self.rate)),
        )

    def _forget_full(self, now: float) -> None:
        """A full bucket is the same as no bucket: dropping it loses nothing."""
        for key in [k for k, (tokens, at) in self._buckets.items()
                    if tokens + (now - at) * self.rate >= self.burst]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_buckets:  # every key busy: drop the oldest half rather than grow
            for key in list(self._buckets)[: self.max_buckets // 2]:
                del self._buckets[key]
