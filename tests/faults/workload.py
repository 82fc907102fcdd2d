"""The clients of the fault suite: a partner creating payments through the gateway (every
POST sent 1–3 times at once with the same Idempotency-Key, and again after any answer
that leaves the outcome unknown), and checkers deciding approvals. They behave as a
careful client must while the platform is being broken under them: retry what may not
have happened with the same key, honour 429 Retry-After, and never accept a 500.

Kinds of payment and the end each must reach, whatever faults are injected:

    auto            < 1,000.00 EUR, auto-approved              settled
    one_checker     1,000.00 – 9,999.99, one checker approves   settled
    two_checkers    ≥ 10,000.00, two distinct checkers approve  settled
    rejected        needs approval, the checker rejects         rejected
    cancelled       needs approval, the maker cancels first     cancelled
    insufficient    more than its account holds                 failed (insufficient_funds)
    processor_fail  amount ending in 13/14: the sandbox fails   failed, hold voided
    processor_nope  amount ending in 22: the sandbox refuses    failed, hold voided
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import httpx

IBAN = "DE89370400440532013000"
# Answers after which the outcome of a request is unknown or it was not done: retry (a
# POST with the same key). A 409 is one only when the key is still in flight: its holder
# may have been killed, and the claim's lock lapses after 60 s.
RETRYABLE = {429, 502, 503, 504}
KINDS = {  # kind: (weight, expected final status)
    "auto": (14, "settled"), "one_checker": (6, "settled"), "two_checkers": (3, "settled"),
    "rejected": (3, "rejected"), "cancelled": (2, "cancelled"), "insufficient": (4, "failed"),
    "processor_fail": (5, "failed"), "processor_nope": (3, "failed"),
}
FINAL = {"settled", "failed", "rejected", "cancelled"}
SANDBOX_TRIGGERS = {13, 14, 22}


@dataclass
class Planned:
    index: int
    kind: str
    amount: int
    account: str
    copies: int  # POSTs sent at once with the same Idempotency-Key
    id: str | None = None
    answers: list[int] = field(default_factory=list)

    @property
    def expected(self) -> str:
        return KINDS[self.kind][1]


def amount_for(kind: str, rng: random.Random) -> int:
    def plain(low: int, high: int) -> int:  # no sandbox trigger by accident
        while (amount := rng.randint(low, high)) % 100 in SANDBOX_TRIGGERS:
            pass
        return amount

    match kind:
        case "auto":
            return plain(100, 99_999)
        case "one_checker" | "rejected" | "cancelled":
            return plain(100_000, 999_999)
        case "two_checkers":
            return plain(1_000_000, 2_000_000)
        case "insufficient":
            return plain(5_000, 50_000)
        case "processor_fail":
            return rng.randint(1, 999) * 100 + rng.choice((13, 14))
        case "processor_nope":
            return rng.randint(1, 999) * 100 + 22
    raise ValueError(kind)


class Client:
    """One API key's view of the gateway, retrying like a careful partner."""

    def __init__(self, base: str, key: str, *, who: str) -> None:
        self.who = who
        self.http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    async def close(self) -> None:
        await self.http.aclose()

    async def get(self, path: str, *, deadline_s: float = 300, **params) -> dict:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        while True:
            try:
                response = await self.http.get(path, params=params)
            except httpx.HTTPError:
                response = None
            if response is not None:
                if response.status_code == 200:
                    return response.json()
                assert _unknown(response), f"{self.who} GET {path}: {response.status_code} {response.text}"
            assert loop.time() < give_up, f"{self.who} GET {path} kept failing for {deadline_s}s"
            await asyncio.sleep(_pause(response))

    async def post(self, path: str, body: dict | None, *, key: str, copies: int = 1, deadline_s: float = 180,
                   done: tuple[int, ...] = (200, 201)) -> tuple[httpx.Response, list[int]]:
        """POST `copies` times at once with one key, then again after any unknown outcome,
        until an answer in `done` (or another final answer) comes back. Returns it and
        every status seen. Every success must be the same object."""
        loop = asyncio.get_running_loop()
        give_up, seen, bodies = loop.time() + deadline_s, [], []
        while True:
            answers = await asyncio.gather(*(self._post(path, body, key) for _ in range(copies)))
            seen += [a.status_code if a is not None else 0 for a in answers]
            final = [a for a in answers if not _unknown(a)]
            for answer in final:
                assert answer.status_code < 500, f"{self.who} POST {path}: {answer.status_code} {answer.text}"
                bodies.append(answer.json())
            if final:
                ids = {b.get("id") for b in bodies if "id" in b}
                assert len(ids) <= 1, f"{self.who} POST {path} key {key}: one key, several objects {ids}"
                return next(a for a in final if a.status_code in done) if any(
                    a.status_code in done for a in final) else final[0], seen
            assert loop.time() < give_up, f"{self.who} POST {path} key {key}: no final answer in {deadline_s}s: {seen}"
            await asyncio.sleep(_pause(next((a for a in answers if a is not None), None)))

    async def _post(self, path: str, body: dict | None, key: str) -> httpx.Response | None:
        try:
            return await self.http.post(path, json=body, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            return None  # the connection broke: the outcome is unknown, like a 502


def _unknown(response: httpx.Response | None) -> bool:
    if response is None or response.status_code in RETRYABLE:
        return True
    return response.status_code == 409 and response.json().get("code") == "idempotency_key_in_flight"


def _pause(response: httpx.Response | None) -> float:
    if response is not None and response.status_code == 429:
        return float(response.headers.get("Retry-After", "1"))
    return 0.3


async def each_page(client: Client, path: str, **params):
    cursor = None
    while True:
        page = await client.get(path, limit=100, **params, **({"cursor": cursor} if cursor else {}))
        for item in page["data"]:
            yield item
        cursor = page.get("next_cursor")
        if not cursor:
            return
