"""Idempotency-Key against real PostgreSQL through a real FastAPI app: one key, one effect."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from fastapi import APIRouter
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import text

from shared.api import SessionmakerDep, create_app
from shared.errors import Conflict
from shared.idempotency import IdempotencyDep, parse_key, purge_expired_keys, request_fingerprint
from shared.settings import KitSettings
from shared.tests.kit_app import PUBLIC_PEM, bearer, client, kit_database

SERVICE = "idemtest"
PATH = "/counters/{counter}/increments"
# Per-counter knobs the use case reads: a crash budget and a delay (seconds).
CRASHES: dict[str, int] = {}
DELAYS: dict[str, float] = {}


class IncrementCreate(BaseModel):
    by: int = 1
    refuse: bool = False


class IncrementPublic(BaseModel):
    counter: str
    value: int


def counters_router() -> APIRouter:
    router = APIRouter()

    @router.post(PATH, status_code=201)
    async def increment(counter: str, body: IncrementCreate, idem: IdempotencyDep, sessionmaker: SessionmakerDep):
        async def use_case(uow) -> IncrementPublic:
            if body.refuse:
                raise Conflict(f"Counter {counter} is frozen.")
            value = (await uow.session.execute(
                text("INSERT INTO counters (id, value) VALUES (:id, :by) "
                     "ON CONFLICT (id) DO UPDATE SET value = counters.value + :by RETURNING value"),
                {"id": counter, "by": body.by},
            )).scalar_one()
            if DELAYS.get(counter):
                await asyncio.sleep(DELAYS[counter])
            if CRASHES.get(counter, 0) > 0:
                CRASHES[counter] -= 1
                raise RuntimeError("the process fell over after the effect, before commit")
            return IncrementPublic(counter=counter, value=value)

        return await idem.run(sessionmaker, use_case,
                              headers=lambda result: {"Location": f"/counters/{result.counter}"})

    return router


@pytest.fixture(scope="module")
async def database(platform):
    async with kit_database(platform, prefix="idem") as parts:
        yield parts


@pytest.fixture(scope="module")
def app(database):
    db, engine, sessionmaker = database
    settings = KitSettings(service_name=SERVICE, database_url=db.app_url, internal_token_public_key=PUBLIC_PEM)
    return create_app(service_name=SERVICE, settings=settings, routers=[counters_router()], engine=engine,
                      sessionmaker=sessionmaker)


async def counter_value(sessionmaker, counter: str) -> int | None:
    async with sessionmaker() as session:
        return (await session.execute(text("SELECT value FROM counters WHERE id = :id"), {"id": counter})).scalar()


def post(http, counter: str, *, key: str | None, body: dict | None = None, principal: str = "alice"):
    headers = bearer(principal=principal)
    if key is not None:
        headers["Idempotency-Key"] = key
    return http.post(f"/counters/{counter}/increments", json=body or {"by": 1}, headers=headers)


def replays() -> float:
    return REGISTRY.get_sample_value("clearhouse_idempotent_replays_total", {"service": SERVICE}) or 0.0


async def test_a_retry_replays_the_first_answer_without_a_second_effect(app, database):
    sessionmaker = database[2]
    before = replays()
    async with client(app) as http:
        first = await post(http, "replay", key="k-replay", body={"by": 5})
        second = await post(http, "replay", key="k-replay", body={"by": 5})
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json() == {"counter": "replay", "value": 5}
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["location"] == first.headers["location"] == "/counters/replay"
    assert second.headers["request-id"] != first.headers["request-id"]  # ids are per request, not stored
    assert await counter_value(sessionmaker, "replay") == 5
    assert replays() == before + 1


async def test_the_same_payload_serialised_differently_is_still_a_replay(app, database):
    async with client(app) as http:
        headers = {**bearer(), "Idempotency-Key": "k-canonical", "content-type": "application/json"}
        first = await http.post("/counters/canon/increments", content=b'{"by": 2, "refuse": false}', headers=headers)
        second = await http.post("/counters/canon/increments", content=b'{"refuse":false,"by":2}', headers=headers)
    assert second.headers["idempotent-replayed"] == "true" and second.json() == first.json()
    assert await counter_value(database[2], "canon") == 2


async def test_a_quoted_key_is_the_same_key(app, database):
    async with client(app) as http:
        await post(http, "quoted", key='"k-quoted"')
        second = await post(http, "quoted", key="k-quoted")
    assert second.headers["idempotent-replayed"] == "true"
    assert await counter_value(database[2], "quoted") == 1


async def test_the_same_key_with_another_payload_is_refused(app, database):
    async with client(app) as http:
        await post(http, "reuse", key="k-reuse", body={"by": 1})
        refused = await post(http, "reuse", key="k-reuse", body={"by": 100})
    assert refused.status_code == 422
    assert refused.json()["code"] == "idempotency_key_reused"
    assert await counter_value(database[2], "reuse") == 1


async def test_without_a_key_every_request_takes_effect(app, database):
    async with client(app) as http:
        for _ in range(3):
            assert (await post(http, "nokey", key=None)).status_code == 201
    assert await counter_value(database[2], "nokey") == 3


@pytest.mark.parametrize("key", [b"", b"x" * 256, "naïve".encode()])
async def test_a_malformed_key_is_a_400(app, key):
    async with client(app) as http:
        headers = {**bearer(), "Idempotency-Key": key}
        response = await http.post("/counters/bad/increments", json={"by": 1}, headers=headers)
    assert response.status_code == 400 and response.json()["code"] == "invalid_idempotency_key"


def test_key_parsing():
    assert parse_key([]) is None
    assert parse_key(["abc"]) == parse_key(['"abc"']) == "abc"
    assert parse_key(["x" * 255]) == "x" * 255


async def test_concurrent_requests_with_one_key_take_effect_once(app, database):
    DELAYS["race"] = 0.3
    try:
        async with client(app) as http:
            responses = await asyncio.gather(*(post(http, "race", key="k-race") for _ in range(8)))
    finally:
        DELAYS.pop("race")
    statuses = sorted(r.status_code for r in responses)
    fresh = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    assert set(statuses) <= {201, 409}
    for response in responses:
        if response.status_code == 409:
            assert response.json()["code"] == "idempotency_key_in_flight"
            assert response.headers["retry-after"] == "1"
        else:
            assert response.json() == fresh[0].json()
    assert await counter_value(database[2], "race") == 1


async def test_a_crash_rolls_back_and_the_retry_runs(app, database):
    CRASHES["crash"] = 1
    async with client(app) as http:
        crashed = await post(http, "crash", key="k-crash")
        retried = await post(http, "crash", key="k-crash")
        replayed = await post(http, "crash", key="k-crash")
    assert crashed.status_code == 500 and crashed.json()["code"] == "internal_error"
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
    assert replayed.headers["idempotent-replayed"] == "true" and replayed.json() == retried.json()
    assert await counter_value(database[2], "crash") == 1


async def test_a_domain_refusal_is_remembered_and_replayed(app, database):
    async with client(app) as http:
        first = await post(http, "frozen", key="k-frozen", body={"by": 1, "refuse": True})
        second = await post(http, "frozen", key="k-frozen", body={"by": 1, "refuse": True})
    assert first.status_code == second.status_code == 409
    assert first.headers["content-type"] == second.headers["content-type"] == "application/problem+json"
    assert first.json() == second.json() and first.json()["code"] == "conflict"
    assert second.headers["idempotent-replayed"] == "true"
    assert await counter_value(database[2], "frozen") is None


async def test_keys_are_scoped_by_principal(app, database):
    async with client(app) as http:
        alice = await post(http, "scoped", key="k-shared", principal="alice")
        bob = await post(http, "scoped", key="k-shared", principal="bob")
    assert alice.status_code == bob.status_code == 201
    assert "idempotent-replayed" not in bob.headers
    assert (alice.json()["value"], bob.json()["value"]) == (1, 2)
    assert await counter_value(database[2], "scoped") == 2


async def insert_in_flight(sessionmaker, *, counter: str, key: str, lock_offset_s: float, body: dict) -> None:
    """A claim as a request that is still running (or died) leaves it."""
    async with sessionmaker() as session, session.begin():
        await session.execute(text(
            "INSERT INTO idempotency_keys (tenant_id, principal, method, path, key, request_hash, status, "
            "locked_until, lock_token) VALUES ('t1', 'alice', 'POST', :path, :key, :hash, 'in_flight', "
            "clock_timestamp() + make_interval(secs => :offset), gen_random_uuid())"),
            {"path": f"/counters/{counter}/increments", "key": key, "offset": lock_offset_s,
             "hash": request_fingerprint(json.dumps(body).encode())})


async def test_a_live_claim_answers_409_with_retry_after(app, database):
    await insert_in_flight(database[2], counter="busy", key="k-busy", lock_offset_s=30, body={"by": 1})
    async with client(app) as http:
        response = await post(http, "busy", key="k-busy")
    assert response.status_code == 409 and response.headers["retry-after"] == "1"
    assert response.json()["code"] == "idempotency_key_in_flight"
    assert await counter_value(database[2], "busy") is None


async def test_an_expired_claim_is_taken_over(app, database):
    await insert_in_flight(database[2], counter="orphan", key="k-orphan", lock_offset_s=-1, body={"by": 1})
    async with client(app) as http:
        taken_over = await post(http, "orphan", key="k-orphan")
        replayed = await post(http, "orphan", key="k-orphan")
    assert taken_over.status_code == 201 and taken_over.json()["value"] == 1
    assert replayed.headers["idempotent-replayed"] == "true"
    assert await counter_value(database[2], "orphan") == 1


async def test_a_holder_that_lost_its_claim_cannot_commit_its_effect(app, database):
    """The first request outlives its lock; a retry takes over. Only one effect survives."""
    sessionmaker = database[2]
    DELAYS["slow"] = 1.0
    async with client(app) as http:
        slow = asyncio.create_task(post(http, "slow", key="k-slow"))
        await asyncio.sleep(0.3)
        async with sessionmaker() as session, session.begin():  # as if 60 s had passed
            await session.execute(text("UPDATE idempotency_keys SET locked_until = clock_timestamp() - interval '1s' "
                                       "WHERE key = 'k-slow'"))
        DELAYS.pop("slow")
        retry = await post(http, "slow", key="k-slow")
        first = await slow
    assert first.status_code == 409 and first.json()["code"] == "idempotency_key_in_flight"
    assert retry.status_code == 201 and retry.json()["value"] == 1
    assert await counter_value(sessionmaker, "slow") == 1


async def test_purge_forgets_only_old_keys(database):
    sessionmaker = database[2]
    async with sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM idempotency_keys"))
        for key, age_h in (("old", 49), ("recent", 1)):
            await session.execute(text(
                "INSERT INTO idempotency_keys (tenant_id, principal, method, path, key, request_hash, status, "
                "response_status, response_body, response_headers, created_at) VALUES ('t1', 'alice', 'POST', '/x', "
                ":key, 'h', 'completed', 201, '\\x7b7d'::bytea, '{}', "
                "clock_timestamp() - make_interval(hours => :age))"),
                {"key": key, "age": age_h})
    assert await purge_expired_keys(sessionmaker) == 1
    async with sessionmaker() as session:
        assert (await session.execute(text("SELECT array_agg(key) FROM idempotency_keys"))).scalar() == ["recent"]
    with pytest.raises(ValueError):
        await purge_expired_keys(sessionmaker, older_than=timedelta(hours=1))
