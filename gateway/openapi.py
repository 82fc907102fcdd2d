"""One OpenAPI document for the whole public API, merged from the services' own.

Each service's `/openapi.json` is fetched (at startup, then again when older than
`openapi_cache_ttl_s`; a service that was down is retried every `openapi_retry_s`) and
merged into the gateway's:

  - only the public paths each service owns (`/v1/<service>...`); probes and
    `/internal/...` stay private;
  - component names are prefixed per service (`ledger.AccountPublic`) and every `$ref`
    rewritten, so two services' `AccountPublic` cannot clash; the kit's shared error
    shapes (Problem, FieldProblem) are kept once, unprefixed;
  - operation ids are prefixed too; every operation gets the `ApiKey` bearer scheme
    (webhooks: none), its required scope (`x-clearhouse-scope`) and the gateway's own
    errors (401, 403, 413, 429, 502, 503, 504).

A service that cannot be reached is listed under `info.x-clearhouse-unavailable` and its
paths are absent until a retry succeeds: the document never fails because one part did.
This module must never publish a service's internal or operational paths.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

from gateway.composition import EXPANSIONS
from gateway.errors import GATEWAY_ERRORS, NotFound
from gateway.routes import WEBHOOKS_PREFIX, resolve
from gateway.settings import UPSTREAMS
from gateway.upstream import Upstreams
from shared.errors import Problem, problem_responses

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_S = 2.0
_SHARED_SCHEMAS = frozenset({"Problem", "FieldProblem"})
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
SECURITY_SCHEME = {
    "ApiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "API key (ch_live_…)",
               "description": "A Clearhouse API key: `Authorization: Bearer ch_live_<id>_<secret>`. "
                              "Create one with `clearhouse keys create`."}
}
DESCRIPTION = """\
Clearhouse's public API, served by the gateway. Authenticate with an API key as a bearer
token; each operation names the scope it needs (`x-clearhouse-scope`). Send an
`Idempotency-Key` on every POST. Every error is `application/problem+json` with a stable
`code` and a `trace_id`; every response carries `Request-Id`. Rate limits are per key
(`RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`; `Retry-After` on 429).
A composed answer missing a part is 206 with `partial: true` and `missing`.
"""


class OpenApiMerger:
    def __init__(self, *, base: Any, upstreams: Upstreams, ttl_s: float, retry_s: float) -> None:
        self._base = base  # () -> the gateway's own document (its own routes)
        self._upstreams = upstreams
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._docs: dict[str, tuple[dict, float]] = {}
        self._attempted: dict[str, float] = {}
        self._merged: tuple[tuple, dict] | None = None
        self._lock = asyncio.Lock()

    async def document(self) -> dict:
        async with self._lock:  # one refresh at a time; the rest wait for its result
            await self._refresh()
            identity = tuple(sorted((s, at) for s, (_, at) in self._docs.items()))
            if self._merged is None or self._merged[0] != identity:
                self._merged = (identity, self._merge())
            return self._merged[1]

    async def _refresh(self) -> None:
        now = time.monotonic()
        due = [s for s in UPSTREAMS
               if (s in self._docs and now - self._docs[s][1] > self._ttl_s)
               or (s not in self._docs and now - self._attempted.get(s, -1e9) > self._retry_s)]
        if due:
            await asyncio.gather(*(self._fetch(s) for s in due))

    async def _fetch(self, service: str) -> None:
        self._attempted[service] = time.monotonic()
        client = self._upstreams.clients[service]
        try:
            response = await client.get("/openapi.json", timeout=_FETCH_TIMEOUT_S)
            response.raise_for_status()
            doc = response.json()
            if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
                raise ValueError("not an OpenAPI document")
        except Exception as exc:  # keep the last good copy, if any; the document must still be served
            log.warning("cannot fetch the %s OpenAPI document: %s", service, type(exc).__name__)
            return
        self._docs[service] = (doc, time.monotonic())

    def _merge(self) -> dict:
        merged = copy.deepcopy(self._base())
        merged["info"] = {"title": "Clearhouse API", "version": merged.get("info", {}).get("version", "1"),
                          "description": DESCRIPTION}
        components = merged.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(SECURITY_SCHEME)
        _add_problem_schemas(components.setdefault("schemas", {}))
        for path, item in merged.get("paths", {}).items():
            _decorate(path, item)
        unavailable = []
        for service in UPSTREAMS:
            if service not in self._docs:
                unavailable.append(service)
                continue
            _merge_service(merged, service, self._docs[service][0])
        if unavailable:
            merged["info"]["x-clearhouse-unavailable"] = unavailable
        merged["paths"] = dict(sorted(merged.get("paths", {}).items()))
        return merged


def _merge_service(merged: dict, service: str, doc: dict) -> None:
    renames: dict[str, dict[str, str]] = {}
    for section, items in (doc.get("components") or {}).items():
        if section == "securitySchemes" or not isinstance(items, dict):
            continue
        renames[section] = {name: name if section == "schemas" and name in _SHARED_SCHEMAS else f"{service}.{name}"
                            for name in items}
    components = merged.setdefault("components", {})
    for section, names in renames.items():
        target = components.setdefault(section, {})
        for name, new_name in names.items():
            if new_name in target and new_name == name:
                continue  # a shared kit shape, already present
            target[new_name] = _rewrite(doc["components"][section][name], renames)
    prefix = f"/v1/{service}"
    for path, item in doc.get("paths", {}).items():
        if path != prefix and not path.startswith(prefix + "/"):
            continue
        item = _rewrite(item, renames)
        for method in _METHODS:
            operation = item.get(method)
            if isinstance(operation, dict) and operation.get("operationId"):
                operation["operationId"] = f"{service}_{operation['operationId']}"
            if isinstance(operation, dict) and not operation.get("tags"):
                operation["tags"] = [service]
        _decorate(path, item)
        merged.setdefault("paths", {})[path] = item


def _add_problem_schemas(schemas: dict) -> None:
    """The gateway's error responses refer to Problem; make sure it is defined."""
    if "Problem" in schemas:
        return
    found = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(found.pop("$defs", {}))
    schemas["Problem"] = found


def _rewrite(node: Any, renames: dict[str, dict[str, str]]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/components/"):
                _, _, section, name = value.split("/", 3)
                value = f"#/components/{section}/{renames.get(section, {}).get(name, name)}"
            out[key] = _rewrite(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite(v, renames) for v in node]
    return node


def _decorate(path: str, item: dict) -> None:
    """Security, scope and the gateway's own errors on every operation of a path."""
    for method in _METHODS:
        operation = item.get(method)
        if not isinstance(operation, dict):
            continue
        route = resolve(method.upper(), path.replace("{", "x").replace("}", "x"))
        responses = operation.setdefault("responses", {})
        if route is None or route.scope is None or path.startswith(WEBHOOKS_PREFIX):
            operation["security"] = []
            gateway_errors = [e for e in GATEWAY_ERRORS if e.status not in (401, 403, 429)]
        else:
            operation["security"] = [{"ApiKey": []}]
            operation["x-clearhouse-scope"] = route.scope
            note = f"Requires the scope `{route.scope}`."
            if note not in operation.get("description", ""):
                operation["description"] = (operation.get("description", "") + "\n\n" + note).strip()
            gateway_errors = list(GATEWAY_ERRORS)
        if method in ("get", "head", "delete"):
            gateway_errors = [e for e in gateway_errors if e.status != 413]
        if "{" in path:
            # A path parameter of `.`, `..` or nothing is refused by the gateway itself (routes.resolve),
            # and one no route of the service matches is the service's 404: any such operation can answer it.
            gateway_errors.append(NotFound)
        _problem_validation_errors(responses)
        for status, response in problem_responses(*gateway_errors).items():
            response = {k: v for k, v in response.items() if k != "model"}
            existing = responses.get(str(status))
            if existing is None:
                responses[str(status)] = response
            elif response["description"] not in existing.get("description", ""):
                existing["description"] = f"{existing.get('description', '')}; gateway: {response['description']}"
        if method == "get" and _is_payment_path(path):
            _add_expand(operation)


def _problem_validation_errors(responses: dict) -> None:
    """FastAPI documents its automatic 422 as `application/json` HTTPValidationError, but the
    kit's handler answers every validation failure as problem+json: say what is sent."""
    for status, response in responses.items():
        schema = ((response.get("content") or {}).get("application/json") or {}).get("schema") or {}
        if str(schema.get("$ref", "")).endswith("HTTPValidationError"):
            responses[status] = {k: v for k, v in problem_responses(int(status))[int(status)].items() if k != "model"}
            responses[status]["description"] = "Unprocessable Content (validation_error)"


def _is_payment_path(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 4 and parts[1:3] == ["v1", "payments"] and parts[3].startswith("{")


def _add_expand(operation: dict) -> None:
    parameters = operation.setdefault("parameters", [])
    if any(p.get("name") == "expand" for p in parameters if isinstance(p, dict)):
        return
    parameters.append({
        "name": "expand", "in": "query", "required": False, "style": "form", "explode": True,
        "schema": {"type": "array", "items": {"type": "string", "enum": list(EXPANSIONS)}},
        "description": "Embed related resources composed by the gateway: `approval` (needs approvals:read), "
                       "`ledger_hold` (needs ledger:read). A part that cannot be read makes the answer 206 "
                       "with `partial: true` and `missing`.",
    })
