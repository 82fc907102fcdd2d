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
from shared.db import make_engine
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


async def test_a_request_in_flight_holds_the_key_until_it_commits(app, database):
    """While the first request's transaction is open a retry is told to wait (409 with
    Retry-After); once it committed, the retry gets its answer."""
    DELAYS["busy"] = 0.6
    try:
        async with client(app) as http:
            first = asyncio.create_task(post(http, "busy", key="k-busy"))
            await asyncio.sleep(0.3)
            during = await post(http, "busy", key="k-busy")
            done = await first
            after = await post(http, "busy", key="k-busy")
    finally:
        DELAYS.pop("busy")
    assert during.status_code == 409 and during.headers["retry-after"] == "1"
    assert during.json()["code"] == "idempotency_key_in_flight"
    assert done.status_code == 201 and "idempotent-replayed" not in done.headers
    assert after.headers["idempotent-replayed"] == "true" and after.json() == done.json()
    assert await counter_value(database[2], "busy") == 1


async def test_a_holder_killed_mid_transaction_frees_the_key(app, database, platform):
    """The server ends the first request's session mid-flight (as a crash would): its
    effect rolls back, its lock goes with it, and the retry runs once."""
    sessionmaker = database[2]
    DELAYS["killed"] = 1.0
    try:
        async with client(app) as http:
            first = asyncio.create_task(post(http, "killed", key="k-killed"))
            await asyncio.sleep(0.4)
            async with sessionmaker() as session, session.begin():
                killed = (await session.execute(text(
                    "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()"))).scalar()
            crashed = await first
            DELAYS.pop("killed")
            retried = await post(http, "killed", key="k-killed")
    finally:
        DELAYS.pop("killed", None)
    assert killed == 1
    assert crashed.status_code >= 500
    assert retried.status_code == 201 and retried.json()["value"] == 1
    assert await counter_value(sessionmaker, "killed") == 1


async def test_an_answer_stored_by_another_request_wins_over_ours(app, database):
    """A request whose read missed an answer committed an instant earlier must not commit a
    second effect: the stored answer is the key's answer."""
    sessionmaker = database[2]
    DELAYS["late"] = 0.5
    try:
        async with client(app) as http:
            late = asyncio.create_task(post(http, "late", key="k-late"))
            await asyncio.sleep(0.25)
            # As if another request had answered after our read: the row appears under us.
            async with sessionmaker() as session, session.begin():
                await session.execute(text(
                    "INSERT INTO idempotency_keys (tenant_id, principal, method, path, key, request_hash, status, "
                    "response_status, response_body, response_headers) VALUES ('t1', 'alice', 'POST', :path, "
                    "'k-late', :hash, 'completed', 201, :body, '{\"content-type\": \"application/json\"}')"),
                    {"path": "/counters/late/increments", "hash": request_fingerprint(json.dumps({"by": 1}).encode()),
                     "body": b'{"counter": "late", "value": 41}'})
            answer = await late
    finally:
        DELAYS.pop("late")
    assert answer.status_code == 201 and answer.json() == {"counter": "late", "value": 41}
    assert answer.headers["idempotent-replayed"] == "true"
    assert await counter_value(sessionmaker, "late") is None


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


async def test_a_transaction_its_process_abandoned_frees_the_key_by_itself(app, database):
    """A request whose transaction was left open (its task cancelled, its connection never
    returned) must not hold its Idempotency-Key forever: the server ends the idle
    transaction, and with it the key's lock."""
    db = database[0]
    engine = make_engine(db.app_url, pool_size=1, idle_in_transaction_timeout_s=1)
    try:
        abandoned = await engine.connect()
        await abandoned.begin()
        lock_key = "idempotency:t1:alice:POST:/counters/abandoned/increments:k-abandoned"
        await abandoned.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": lock_key})
        async with client(app) as http:
            held = await post(http, "abandoned", key="k-abandoned")
            await asyncio.sleep(2.5)  # the holder never says another word
            freed = await post(http, "abandoned", key="k-abandoned")
    finally:
        await engine.dispose()
    assert held.status_code == 409 and held.json()["code"] == "idempotency_key_in_flight"
    assert freed.status_code == 201 and freed.json()["value"] == 1
