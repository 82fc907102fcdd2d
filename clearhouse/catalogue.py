"""The event catalogue, generated from the code: every service's `schemas.EVENT_SCHEMAS`
(event type → pydantic payload model) rendered as JSON Schema in docs/event-catalogue.md.

`clearhouse events catalogue` writes it; `--check` fails when the committed file is stale,
which the test suite runs, so the catalogue cannot drift from the code.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from clearhouse.serve import SERVICES

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "event-catalogue.md"


def event_schemas() -> dict[str, dict[str, type]]:
    found = {}
    for service in SERVICES:
        try:
            module = importlib.import_module(f"services.{service}.schemas")
        except ModuleNotFoundError:
            continue
        schemas = getattr(module, "EVENT_SCHEMAS", None)
        if schemas:
            found[service] = dict(sorted(schemas.items()))
    return found


def render() -> str:
    lines = ["# Event catalogue", "",
             "Generated from the code by `clearhouse events catalogue`; do not edit by hand.",
             "Envelope: CloudEvents 1.0 binary mode (`ce_id`, `ce_source`, `ce_type`, `ce_subject`,",
             "`ce_time`, `ce_tenantid`, `ce_actor`, `ce_correlationid`, `traceparent`); the data is the",
             "JSON payload below. Consumers ignore unknown fields and unknown types.", ""]
    for service, schemas in event_schemas().items():
        lines += [f"## {service}.events", ""]
        for event_type, model in schemas.items():
            schema = model.model_json_schema()
            lines += [f"### `{event_type}`", ""]
            if schema.get("description"):
                lines += [schema["description"].strip(), ""]
            lines += ["```json", json.dumps(schema, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def write(check: bool = False) -> int:
    content = render()
    if check:
        current = CATALOGUE.read_text() if CATALOGUE.exists() else ""
        if current != content:
            print(f"{CATALOGUE} is stale: run `clearhouse events catalogue`")
            return 1
        return 0
    CATALOGUE.write_text(content)
    print(f"wrote {CATALOGUE}")
    return 0
