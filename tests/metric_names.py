"""Metric names on both sides of the contract between Clearhouse and its operators:

    referenced   every metric the Grafana dashboards and Prometheus alert rules query,
                 parsed out of their PromQL
    exported     every series name a process's /metrics can carry, from its exposition
                 (a family with no sample yet still names its series by type)
    declared     every series name the code registers, for the offline check

Used by tests/deploy (offline) and the live check against a running platform.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# The series names of a family, by type (what a scrape may show for it).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
            "stateset": ("",), "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "unknown": ("",)}
# Every module that registers a Clearhouse metric at import time.
METRIC_MODULES = (
    "shared.metrics", "gateway.proxy", "gateway.composition", "gateway.upstream",
    *(f"services.{service}.{room}" for service in ("payments", "approvals", "ledger", "reconciliation")
      for room in ("api", "service", "jobs", "gauges")),
)

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan", "atan2", "start", "end"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_DURATIONS = re.compile(r"\b(\d+(ms|[smhdwy]))+\b")
_NUMBERS = re.compile(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?\b")
_IDENTIFIER = re.compile(r"(?<![\w:$.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metrics_in_promql(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left of its identifiers once
    strings, label matchers, ranges, label lists, functions and keywords are removed."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = _DURATIONS.sub(" ", text)  # offset 10m
    text = _NUMBERS.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        is_call = text[match.end():].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def _exprs(node) -> Iterable[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for value in node.values():
            yield from _exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _exprs(value)


def dashboard_exprs() -> dict[str, list[str]]:
    return {path.name: list(_exprs(json.loads(path.read_text()))) for path in sorted(DASHBOARDS.glob("*.json"))}


def alert_exprs() -> dict[str, str]:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return {r.get("alert") or r["record"]: r["expr"] for r in rules}


def referenced() -> dict[str, set[str]]:
    """Metric name -> where it is used ("<dashboard>.json", "alert <name>")."""
    uses: dict[str, set[str]] = {}
    for board, exprs in dashboard_exprs().items():
        for expr in exprs:
            for name in metrics_in_promql(expr):
                uses.setdefault(name, set()).add(board)
    for alert, expr in alert_exprs().items():
        for name in metrics_in_promql(expr):
            uses.setdefault(name, set()).add(f"alert {alert}")
    return uses


def exported(exposition: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def declared() -> set[str]:
    for module in METRIC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a service without that room is fine; a broken import is not
                raise
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names
