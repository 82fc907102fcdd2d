"""Offline validation of how Clearhouse is packaged and deployed: the Dockerfile,
docker-compose.yml and everything under deploy/. No Docker engine and no cluster:

    Dockerfile              parsed by BuildKit's own parser (pip `dockerfile`)
    docker-compose.yml      the Compose Specification JSON schema (shipped by pip
                            `check-jsonschema`), and `compose config` when a Compose v2 CLI is
                            on PATH; then the platform's own rules (build, start order, roles)
    deploy/k8s              rendered by `kubectl kustomize` (or `kustomize build`), each object
                            checked by `kubernetes-validate` against Kubernetes KUBERNETES_VERSION,
                            strict; without a renderer, every complete manifest file on its own
    deploy/prometheus       promtool check config / check rules / test rules (promtool is
                            required: `clearhouse test` installs it), plus the rules'
                            structure here in Python
    dashboards and alerts   every PromQL expression parses (promtool), and names only metrics
                            the code registers (tests/metric_names.py; the live check against
                            a running platform is in tests/test_money_flow.py)

Nothing is skipped: a missing optional renderer narrows a check, never removes it; a missing
promtool fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml

from clearhouse.serve import SERVICES
from clearhouse.up import API_PORTS
from tests import metric_names
from shared.kafka import DEFAULT_PARTITIONS, service_topics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest minor the major managed offerings still run
PLATFORM = (*SERVICES, "gateway")  # everything with a database of its own
ALERTS = {"OutboxStuck", "ConsumerLagGrowing", "DLQNotEmpty", "HighErrorRate", "RelayNoActiveReplica",
          "PaymentsStuckApproved", "ApprovalQueueStale", "ReconciliationBreakOlderThanADay", "DomainGaugesNotRefreshing"}
METRICS_PORT = "9100"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}:\n{result.stdout}\n{result.stderr}"


# ── Dockerfile ─────────────────────────────────────────────────────────────────────────────


def test_dockerfile_is_multi_stage_non_root_and_enters_through_clearhouse():
    instructions = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    froms = [i for i in instructions if i.cmd == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    final = instructions[instructions.index(froms[-1]):]
    args = {i.value[0].split("=", 1)[0]: i.value[0].split("=", 1)[1] for i in instructions if i.cmd == "ARG" and "=" in i.value[0]}
    base = froms[-1].value[0]
    base = args.get(base.strip("${}"), base)
    assert base.startswith("python:3.11") and "slim" in base

    final_cmds = [i.cmd for i in final]
    assert "HEALTHCHECK" not in [i.cmd for i in instructions], "compose and Kubernetes probe per role"
    user = [i for i in final if i.cmd == "USER"][-1].value[0]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "numeric non-root uid, for runAsNonRoot"
    entrypoint = [i for i in final if i.cmd == "ENTRYPOINT"][-1]
    assert entrypoint.json and list(entrypoint.value) == ["clearhouse"]
    copied = [i.value for i in final if i.cmd == "COPY" and any(f.startswith("--from=") for f in i.flags)]
    assert ("/opt/venv", "/opt/venv") in copied, "the runtime takes the builder's venv"
    # The runtime stage installs nothing: no package manager, no compiler, no pip.
    for instruction in final:
        if instruction.cmd == "RUN":
            assert not re.search(r"\b(apt-get|apt|pip|gcc|build-essential|make)\b", instruction.value[0]), instruction
    assert final_cmds.index("USER") > max(i for i, c in enumerate(final_cmds) if c in ("RUN", "COPY"))


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".clearhouse"} <= ignored


# ── docker compose ─────────────────────────────────────────────────────────────────────────


@cache
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def services() -> dict[str, dict]:
    return compose()["services"]


def compose_cli() -> list[str] | None:
    """A Compose v2 command line, if this machine has one (`config` needs no engine)."""
    if shutil.which("docker") and run("docker", "compose", "version", "--short").returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        version = run("docker-compose", "version", "--short").stdout.strip().lstrip("v")
        if version.startswith("2"):
            return ["docker-compose"]
    return None


def test_compose_file_follows_the_compose_specification():
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = sorted(validator(schema).iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # Compose's own loader also resolves interpolation, merges and paths.
    cli = compose_cli()
    if cli:
        assert_ran(run(*cli, "-f", "docker-compose.yml", "config", "--quiet"))


def test_every_built_service_uses_the_repository_dockerfile():
    built = {name: s["build"] for name, s in services().items() if "build" in s}
    assert built, "Clearhouse images are built by `docker compose up`"
    for name, build in built.items():
        assert (ROOT / build["context"]).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
    # Anything running the clearhouse image builds it, so `up` never pulls a missing image.
    for name, service in services().items():
        if service.get("image") == "clearhouse:local":
            assert name in built, name


def test_depends_on_targets_exist_and_conditions_fit_them():
    names = set(services())
    one_shots = {n for n, s in services().items() if s.get("restart") == "no"}
    for name, service in services().items():
        for target, dependency in (service.get("depends_on") or {}).items():
            assert target in names, f"{name} depends on unknown {target}"
            condition = dependency["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services()[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            if target in one_shots:
                assert condition == "service_completed_successfully", f"{name} must wait for {target} to finish"
    # The graph has an order at all: no cycles.
    remaining = {n: set(s.get("depends_on") or {}) for n, s in services().items()}
    while remaining:
        ready = [n for n, deps in remaining.items() if not deps & set(remaining)]
        assert ready, f"depends_on cycle among {sorted(remaining)}"
        for n in ready:
            del remaining[n]


def env(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (services()[name].get("environment") or {}).items()}


def test_compose_runs_every_process_with_its_own_database_role():
    for service in PLATFORM:
        db, migrate = f"{service}-db", f"{service}-migrate"
        assert services()[db]["image"].startswith("postgres:16"), db
        assert env(db)["CLEARHOUSE_DB"] == f"clearhouse_{service}"
        assert services()[migrate]["command"] == ["migrate", service, "--app-role", f"clearhouse_{service}_app"]
        assert services()[migrate]["depends_on"][db]["condition"] == "service_healthy"
        assert re.fullmatch(rf"postgresql://clearhouse_{service}_owner:[^@]+@{db}:5432/clearhouse_{service}",
                            env(migrate)["MIGRATION_DATABASE_URL"])
        processes = [service] if service == "gateway" else [f"{service}-{role}" for role in ("api", "relay", "consumer")]
        for name in processes:
            role = "api" if name in ("gateway", f"{service}-api") else name.rsplit("-", 1)[1]
            assert services()[name]["command"] == ["serve", service, "--role", role], name
            assert services()[name]["depends_on"][migrate]["condition"] == "service_completed_successfully", name
            assert services()[name]["depends_on"]["secrets-init"]["condition"] == "service_completed_successfully", name
            # The app role, on the service's own server and database only; never the owner.
            assert re.fullmatch(rf"postgresql://clearhouse_{service}_app:[^@]+@{db}:5432/clearhouse_{service}",
                                env(name)["DATABASE_URL"]), name
            assert "MIGRATION_DATABASE_URL" not in env(name), name
            assert env(name)["HOST"] == "0.0.0.0"
            assert env(name)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
            if role == "api":
                assert env(name)["PORT"] == str(API_PORTS[service]), name
            else:
                assert env(name)["METRICS_PORT"] == METRICS_PORT, name
                assert services()[name]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert services()["sandbox"]["command"] == ["serve", "sandbox", "--role", "api"]
    assert env("sandbox")["PORT"] == str(API_PORTS["sandbox"])


def test_each_secret_group_reaches_only_its_service():
    """secrets-init writes groups of secrets; with-secrets.sh exports what is mounted."""
    readers = {"secrets-public": None, "secrets-gateway": {"gateway"}, "secrets-sandbox": {"sandbox"},
               "secrets-payments": {"payments-api", "payments-consumer"}}
    for name, service in services().items():
        for volume in map(str, service.get("volumes", [])):
            group = volume.split(":")[0]
            if group in readers and name != "secrets-init":
                assert readers[group] is None or name in readers[group], f"{name} must not mount {group}"
                assert volume.endswith(":ro"), f"{name} reads {group}, never writes it"
    for name, service in services().items():
        if service.get("image") == "clearhouse:local" and service.get("entrypoint"):
            assert any(str(v).startswith("secrets-public:") for v in service["volumes"]), name


def test_compose_topics_and_k8s_topics_are_the_code_topics():
    kafka_init = env("kafka-init")
    assert kafka_init["CLEARHOUSE_TOPICS"].split() == service_topics()
    assert int(kafka_init["PARTITIONS"]) == DEFAULT_PARTITIONS
    job = load_yaml(K8S / "kafka-topics.yaml")
    job_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env["CLEARHOUSE_TOPICS"].split() == service_topics()
    assert int(job_env["PARTITIONS"]) == DEFAULT_PARTITIONS


def test_compose_mounts_exist():
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# ── Prometheus ─────────────────────────────────────────────────────────────────────────────

PROMETHEUS = DEPLOY / "prometheus"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


def test_prometheus_scrapes_every_clearhouse_process():
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name, service in services().items():
        variables = env(name) if service.get("image") == "clearhouse:local" else {}
        command = service.get("command") or []
        if command[:1] == ["serve"] and name != "sandbox":  # the stand-in processor has /healthz only
            port = variables["PORT"] if "--role" in command and command[-1] == "api" else variables["METRICS_PORT"]
            assert f"{name}:{port}" in targets, f"{name} is not scraped on {port}"
    assert "otel-collector:8889" in targets, "span metrics from the collector"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).exists()


def test_alert_rules_are_complete_and_link_their_runbooks():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert rule["expr"].count("{") == rule["expr"].count("}"), rule["alert"]
        assert rule["expr"].count("[") == rule["expr"].count("]"), rule["alert"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("page", "warn"), rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
        runbook = rule["annotations"]["runbook_url"]
        assert runbook == f"docs/runbooks/{rule['alert']}.md"
        assert (ROOT / runbook).is_file(), runbook
    stuck = next(r for r in rules if r["alert"] == "OutboxStuck")
    assert "clearhouse_outbox_oldest_unpublished_age_seconds" in stuck["expr"] and "> 60" in stuck["expr"]
    assert stuck["for"] == "5m"


def test_alert_unit_tests_cover_every_alert():
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert fired == ALERTS


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, ("promtool is missing: install the Debian package `prometheus` "
                   "(`clearhouse test` does it by itself where it may run apt-get)")
    return found


def test_promtool_accepts_config_rules_and_rule_tests():
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert {"global", "rule_files", "scrape_configs"} <= set(config)
    assert all(job["job_name"] and (job.get("static_configs") or job.get("dns_sd_configs")) for job in config["scrape_configs"])
    assert_ran(run(promtool(), "check", "config", str(PROMETHEUS / "prometheus.yml")))
    assert_ran(run(promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")))
    assert_ran(run(promtool(), "test", "rules", str(PROMETHEUS / "alerts_test.yml")))


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The rule checks above can fail: a misspelt function is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "Broken", "expr": "rate(clearhouse_http_requests_total[5m]) > > 1"}]}]}))
    assert run(promtool(), "check", "rules", str(broken)).returncode != 0


def test_every_dashboard_expression_is_valid_promql(tmp_path):
    """Grafana's variables replaced by what Grafana would put there, each expression is
    loaded by promtool as a recording rule, which parses it."""
    exprs = [expr for board in metric_names.dashboard_exprs().values() for expr in board]
    assert exprs
    rules = [{"record": f"clearhouse:dashboard_expression_{i}",
              "expr": expr.replace("$__rate_interval", "1m").replace("$service", ".*")}
             for i, expr in enumerate(exprs)]
    rule_file = tmp_path / "dashboards.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert_ran(run(promtool(), "check", "rules", str(rule_file)))


# ── metric names ───────────────────────────────────────────────────────────────────────────


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bclearhouse_[a-z0-9_]+", text))


def dashboards() -> list[Path]:
    return sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def dashboard_exprs(path: Path) -> list[str]:
    return metric_names.dashboard_exprs()[path.name]


def test_dashboards_and_alerts_use_only_declared_metrics():
    declared = metric_names.declared()
    assert "clearhouse_http_requests_total" in declared and "clearhouse_http_request_duration_seconds_bucket" in declared
    used = metric_names.referenced()
    assert {"clearhouse-overview.json", "clearhouse-money.json"} <= set().union(*used.values())
    unknown = {name: sorted(where) for name, where in used.items() if name not in declared}
    assert not unknown, f"dashboards and alerts use metrics nobody registers: {unknown}"
    # The rule tests' input series must be real metrics too, or they test nothing.
    series = referenced_metrics((PROMETHEUS / "alerts_test.yml").read_text())
    assert series and series <= declared, sorted(series - declared)


def test_the_promql_parser_finds_metric_names_and_nothing_else():
    assert metric_names.metrics_in_promql(
        'label_replace(sum by (type) (rate(clearhouse_events_published_total{type=~"payment\\\\..+"}[$__rate_interval])), '
        '"status", "$1", "type", "payment\\\\.(.+)") > 0 and on (service) up offset 10m unless 1e3 < bool foo:bar'
    ) == {"clearhouse_events_published_total", "up", "foo:bar"}


def test_overview_dashboard_shows_red_outbox_consumers_and_relays():
    [overview] = [p for p in dashboards() if p.name == "clearhouse-overview.json"]
    board = json.loads(overview.read_text())
    assert board["uid"] and board["title"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"]), "panel ids are unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
    used = referenced_metrics("\n".join(dashboard_exprs(overview)))
    assert {
        "clearhouse_http_requests_total", "clearhouse_http_request_duration_seconds_bucket",
        "clearhouse_outbox_backlog", "clearhouse_outbox_oldest_unpublished_age_seconds",
        "clearhouse_consumer_lag", "clearhouse_dlq_messages_total", "clearhouse_relay_active",
    } <= used


def test_money_dashboard_shows_payments_approvals_postings_and_breaks():
    [board_file] = [p for p in dashboards() if p.name == "clearhouse-money.json"]
    board = json.loads(board_file.read_text())
    assert board["uid"] and board["title"] and board["uid"] != "clearhouse-overview"
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"]), "panel ids are unique"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus" and panel["targets"], panel["title"]
    exprs = "\n".join(dashboard_exprs(board_file))
    assert {
        "clearhouse_payments_in_flight", "clearhouse_payments_oldest_in_flight_age_seconds",
        "clearhouse_approvals_pending", "clearhouse_approvals_oldest_pending_age_seconds",
        "clearhouse_ledger_transactions_posted_total", "clearhouse_reconciliation_breaks_open",
        "clearhouse_reconciliation_oldest_open_break_age_seconds", "clearhouse_events_published_total",
    } <= referenced_metrics(exprs)
    assert 'service="payments", type=~"payment' in exprs, "payments by status over time"


def test_grafana_provisioning_matches_the_dashboards_and_datasources():
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = load_yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    assert {"prometheus", "jaeger"} <= {d["uid"] for d in datasources}
    [provider] = load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    mounts = dict(str(v).split(":")[:2] for v in services()["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# ── OpenTelemetry Collector ────────────────────────────────────────────────────────────────


def test_collector_pipelines_scrub_payee_data_and_feed_jaeger_and_prometheus():
    config = load_yaml(DEPLOY / "otel-collector.yaml")
    declared = {kind: set(config.get(kind) or {}) for kind in ("receivers", "processors", "exporters", "connectors")}
    pipelines = config["service"]["pipelines"]
    for name, pipeline in pipelines.items():
        assert set(pipeline["receivers"]) <= declared["receivers"] | declared["connectors"], name
        assert set(pipeline["exporters"]) <= declared["exporters"] | declared["connectors"], name
        assert set(pipeline.get("processors", [])) <= declared["processors"], name
        assert pipeline["processors"][0] == "memory_limiter" and pipeline["processors"][-1] == "batch", name
    traces = pipelines["traces"]
    assert {"attributes/payee", "transform/mask"} <= set(traces["processors"])
    assert {"otlp/jaeger", "spanmetrics"} <= set(traces["exporters"])
    assert any("spanmetrics" in p["receivers"] and "prometheus" in p["exporters"] for p in pipelines.values())
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")

    # The patterns do what the comments say (RE2 and Python agree on this syntax).
    [delete] = config["processors"]["attributes/payee"]["actions"]
    assert delete["action"] == "delete"
    assert re.match(delete["pattern"], "clearhouse.payee.iban") and not re.match(delete["pattern"], "clearhouse.payment_id")
    statement = config["processors"]["transform/mask"]["trace_statements"][0]["statements"][0]
    iban_pattern = re.search(r'"value", "(.+?)", "', statement).group(1).replace("\\\\", "\\")
    assert re.sub(iban_pattern, r"\1**MASKED**", "payee DE89370400440532013000") == "payee DE**MASKED**"


# ── Kubernetes ─────────────────────────────────────────────────────────────────────────────


@cache
def k8s_objects() -> tuple[tuple[dict, ...], bool]:
    """(objects, rendered): the kustomize build when a renderer is installed, else every
    complete manifest file (the overlays' kustomization.yaml files are not objects)."""
    if shutil.which("kubectl"):
        result = run("kubectl", "kustomize", str(K8S))
    elif shutil.which("kustomize"):
        result = run("kustomize", "build", str(K8S))
    else:
        files = [p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"]
        return tuple(d for p in files for d in yaml.safe_load_all(p.read_text()) if d), False
    assert_ran(result)
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d), True


def of_kind(kind: str) -> list[dict]:
    return [o for o in k8s_objects()[0] if o["kind"] == kind]


def test_kubernetes_objects_validate_against_the_pinned_schema():
    objects, rendered = k8s_objects()
    assert len(objects) >= (40 if rendered else 10)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_is_not_vacuous():
    broken = json.loads(json.dumps(of_kind("Deployment")[0]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    present = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    present |= {p.parent.name for p in K8S.glob("*/kustomization.yaml") if p.parent.name != "base"}
    assert listed == present


def pod_specs() -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in of_kind("Deployment") + of_kind("Job")]


def test_every_pod_runs_unprivileged_with_resources_and_a_writable_tmp_only():
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
            for mount in container.get("volumeMounts", []):
                assert "emptyDir" in volumes[mount["name"]], f"{name} writes only to scratch space"


def test_every_deployment_has_the_probes_of_its_role():
    for deployment in of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        component = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        liveness = container["livenessProbe"]["httpGet"]
        if component in ("api", "processor"):
            readiness = container["readinessProbe"]["httpGet"]
            assert liveness["path"] == "/healthz" and readiness["port"] == liveness["port"] == "http", name
            # Only a service with a database waits for it and its migrations.
            assert readiness["path"] == ("/healthz" if name == "sandbox" else "/readyz"), name
        else:
            assert component in ("relay", "consumer"), name
            # The health server beside /metrics (shared/health.py).
            assert liveness == {"path": "/healthz", "port": "metrics"}, name
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
            variables = {e["name"]: e.get("value") for e in container["env"]}
            assert str(ports["metrics"]) == variables["METRICS_PORT"] == METRICS_PORT, name


def test_replicas_fit_partitions_and_disruption_budgets_cover_them():
    deployments = of_kind("Deployment")
    budgets = of_kind("PodDisruptionBudget")
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        component = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        replicas = deployment["spec"]["replicas"]
        if component == "consumer":
            # A consumer group member beyond the partition count gets no partition.
            assert 1 <= replicas <= DEFAULT_PARTITIONS, name
        elif name != "sandbox":
            assert replicas == 2, f"{name}: api serves while one pod drains; relay keeps a hot standby"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == (1 if replicas > 1 else 0), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    # Every budget selects exactly one Deployment's pods.
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"].items()
        matching = [d for d in deployments if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, budget["metadata"]["name"]


def secret_refs(spec: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for c in spec["containers"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_secrets_are_referenced_never_committed():
    objects, rendered = k8s_objects()
    assert not [o for o in objects if o["kind"] == "Secret"], "operators create Secrets; none is committed"
    # Who may read which Secret (beyond each service's own clearhouse-<service>-db).
    readers = {
        "clearhouse-internal-token": None,  # public.pem: everyone; private.pem: checked below
        "clearhouse-payments-payee-keys": {"payments-api", "payments-consumer"},
        "clearhouse-sandbox-processor": {"payments-api", "payments-consumer", "sandbox"},
    }
    for name, spec in pod_specs():
        refs = secret_refs(spec)
        assert ("MIGRATION_DATABASE_URL" in refs) == name.endswith("migrate"), f"{name}: the owner role is for migrations only"
        assert ("INTERNAL_TOKEN_PRIVATE_KEY" in refs) == (name == "gateway-api"), f"{name}: only the gateway signs"
        if not rendered:
            continue  # base files name a placeholder Secret; the overlays' values are checked below
        service = name.split("-")[0]
        for variable, (secret, key) in refs.items():
            if variable.endswith("DATABASE_URL"):
                assert (secret, key) == (f"clearhouse-{service}-db", variable), name
            else:
                assert secret in readers and (readers[secret] is None or name in readers[secret]), f"{name}: {secret}"


def test_overlays_declare_each_service_port_role_and_secret():
    for service in PLATFORM:
        overlay = load_yaml(K8S / service / "kustomization.yaml")
        assert overlay["namePrefix"] == f"{service}-"
        literals = dict(item.split("=", 1) for item in overlay["configMapGenerator"][0]["literals"])
        assert literals["CLEARHOUSE_SERVICE"] == service
        assert literals["PORT"] == str(API_PORTS[service])
        assert literals["APP_ROLE"] == f"clearhouse_{service}_app"
        patches = "\n".join(p["patch"] for p in overlay["patches"])
        assert patches.count(f"value: clearhouse-{service}-db") == 2, service
        assert patches.count(f"value: {API_PORTS[service]}") == 2, service
        expected = ["../base/api"] if service == "gateway" else ["../base/api", "../base/workers"]
        assert overlay["resources"] == expected


def test_kubernetes_readme_explains_partitions_and_the_lease():
    readme = (K8S / "README.md").read_text()
    assert "Partitions and consumer replicas" in readme and "relay lease" in readme
    assert f"**{DEFAULT_PARTITIONS} partitions**" in readme


def test_every_runbook_belongs_to_an_alert():
    runbooks = {p.stem for p in (ROOT / "docs" / "runbooks").glob("*.md")} - {"README"}
    assert runbooks == ALERTS


@pytest.mark.parametrize("script", sorted((DEPLOY / "compose").glob("*.sh")), ids=lambda p: p.name)
def test_compose_shell_scripts_parse(script: Path):
    assert_ran(run("sh", "-n", str(script)))
