"""Bodies no careful client sends, to every POST/PUT of the public API (from the merged
OpenAPI document): oversized (past the gateway's limit: 413), deeply nested JSON, JSON
that is not an object, broken JSON, duplicate keys, huge numbers, and a valid body under
a content type that is not JSON. Each is a problem+json 4xx; none is a 5xx.
"""

from __future__ import annotations

import json

from tests.hostile.world import body_for, document, operations

LIMIT = 1024 * 1024  # gateway max_body_bytes (statements: 10 MiB)
MALFORMED = {
    "deeply nested arrays": b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "deeply nested objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "not an object": b"[1, 2, 3]",
    "a bare string": b'"hello"',
    "null": b"null",
    "broken": b'{"amount": 1,',
    "not utf-8": b'{"name": "\xff\xfe"}',
    "huge number": b'{"amount": 1' + b"0" * 5_000 + b"}",
    "float overflow": b'{"amount": 1e999}',
    "empty": b"",
}
WRONG_TYPES = ["text/plain", "application/xml", "application/x-www-form-urlencoded",
               "multipart/form-data; boundary=xyz", "text/json", "image/png"]


def _clean_4xx(response, *statuses: int) -> str | None:
    if not 400 <= response.status_code < 500 or (statuses and response.status_code not in statuses):
        return f"{response.status_code} {response.text[:200]}"
    if not response.headers["content-type"].startswith("application/problem+json"):
        return f"{response.status_code} content-type {response.headers['content-type']}"
    return None


def _json_operations(hostile):
    return [op for op in operations(document(hostile.gateway)) if op.method in ("POST", "PUT") and op.json_body]


async def test_oversized_bodies_are_413_on_every_operation(hostile, world):
    api = hostile.api(world.key)
    failures = []
    oversized = b'{"name": "' + b"x" * (LIMIT + 1) + b'"}'
    for op in _json_operations(hostile):
        response = await api.request(op.method, world.path(op.template), content=oversized,
                                     headers={"Content-Type": "application/json"})
        if problem := _clean_4xx(response, 413):
            failures.append(f"{op.label}: {problem}")
    statement = await api.request("POST", "/v1/reconciliation/statements", content=b"a" * (10 * LIMIT + 1),
                                  headers={"Content-Type": "text/csv"})
    if problem := _clean_4xx(statement, 413):
        failures.append(f"statement upload: {problem}")
    await api.close()
    assert not failures, "\n".join(failures)


async def test_malformed_json_is_a_clean_4xx_on_every_operation(hostile, world):
    api = hostile.api(world.key)
    failures = []
    for op in _json_operations(hostile):
        for name, raw in MALFORMED.items():
            if name in ("empty", "null") and not op.spec["requestBody"].get("required"):
                continue  # an optional body may be left out (JSON null is "no body" too)
            response = await api.request(op.method, world.path(op.template), content=raw,
                                         headers={"Content-Type": "application/json"})
            if problem := _clean_4xx(response):
                failures.append(f"{op.label} [{name}]: {problem}")
    await api.close()
    assert not failures, "\n".join(failures)


async def test_a_valid_body_under_a_content_type_that_is_not_json_is_refused(hostile, world):
    api = hostile.api(world.key)
    failures = []
    for op in _json_operations(hostile):
        raw = json.dumps(body_for(op, world.ids)).encode()
        for content_type in WRONG_TYPES:
            response = await api.request(op.method, world.path(op.template), content=raw,
                                         headers={"Content-Type": content_type})
            if problem := _clean_4xx(response):
                failures.append(f"{op.label} [{content_type}]: {problem}")
    await api.close()
    assert not failures, "\n".join(failures)
