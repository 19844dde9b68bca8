"""The monitoring files in deploy/: valid for promtool, alert rules that fire when they should, and
PromQL (alerts and dashboard) that names only metrics the gateway exports.

promtool comes from scripts/install-services.sh; without it these tests fail, never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.metrics import Metrics
from tests.deploy.files import GRAFANA, PROMETHEUS_CONFIG, ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = GRAFANA / "dashboards" / "phoenix-gateway.json"

# PromQL's functions, aggregation operators and keywords: never metric names.
FUNCTIONS = frozenset(
    re.findall(
        r"\w+",
        """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min
        count_over_time day_of_month day_of_week day_of_year days_in_month delta deriv exp floor
        histogram_quantile holt_winters hour idelta increase irate label_join label_replace
        last_over_time ln log10 log2 max_over_time min_over_time minute month predict_linear
        present_over_time quantile_over_time rate resets round scalar sgn sort sort_desc sqrt
        stddev_over_time stdvar_over_time sum_over_time time timestamp vector year""",
    )
)
AGGREGATIONS = frozenset(
    re.findall(r"\w+", "sum min max avg group stddev stdvar count count_values bottomk topk quantile")
)
KEYWORDS = frozenset(
    re.findall(r"\w+", "by without on ignoring group_left group_right offset and or unless bool")
)
# Series Prometheus makes itself, not the gateway.
SYNTHETIC = frozenset({"up"})

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$")
# What Grafana puts in for its variables, so that promtool can parse a dashboard's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run scripts/install-services.sh")
    return subprocess.run([path, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def exported_names() -> set[str]:
    """The sample names a real `Metrics()` exports, from its registry's families."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, unknown function names) in a PromQL expression. Strings, label matchers,
    ranges and grouping label lists are dropped first; what is left that is no function,
    aggregation or keyword is a metric name."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    metrics: set[str] = set()
    unknown: set[str] = set()
    for name, call in IDENTIFIER.findall(text):
        if call:
            if name not in FUNCTIONS | AGGREGATIONS:
                unknown.add(name)
        elif name not in AGGREGATIONS | KEYWORDS:
            metrics.add(name)
    return metrics, unknown


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard: panel targets, and the series of `label_values(...)`
    template variables."""
    queries = [target.get("expr", "") for panel in query_panels(board) for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = LABEL_VALUES.match(query)
            queries.append(match.group(1) if match else query)
    return queries


def unknown_names(queries: list[str]) -> list[str]:
    """One line per query that names a metric the gateway does not export or an unknown function."""
    known = exported_names() | SYNTHETIC
    problems = []
    for query in queries:
        metrics, functions = metric_names(query)
        if not metrics:
            problems.append(f"no metric in {query!r}")
        if metrics - known:
            problems.append(f"unknown metric(s) {sorted(metrics - known)} in {query!r}")
        if functions:
            problems.append(f"unknown function(s) {sorted(functions)} in {query!r}")
    return problems


def to_promql(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", query)  # $backend, $model: regex matchers, "All" is .*


# --- promtool --------------------------------------------------------------------------------


def test_prometheus_config_and_its_rule_files_pass_promtool() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_the_gateway() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "phoenix-gateway"
    assert job["static_configs"][0]["targets"] == ["gateway:8080"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query, written as recording rules (Grafana's variables
    replaced by what Grafana would put in)."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": to_promql(query)}
        for index, query in enumerate(dashboard_queries(dashboard()))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- metric names ----------------------------------------------------------------------------


def test_exported_names_come_from_the_registry() -> None:
    names = exported_names()
    assert {"gateway_requests_total", "gateway_backend_up", "gateway_tokens_total"} <= names
    assert "gateway_time_to_first_token_seconds_bucket" in names
    assert "gateway_requests" not in names
    assert "gateway_time_to_first_token_seconds" not in names


def test_metric_names_are_extracted_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, backend) (rate(gateway_ttft_bucket{backend=~"$backend",'
        ' le!="1e3"}[$__rate_interval]))) > 10 and on () max without (instance) (gateway_up offset 5m)'
        " / ignoring (x) group_left (y) other_metric"
    )
    assert metric_names(expr) == ({"gateway_ttft_bucket", "gateway_up", "other_metric"}, set())
    assert metric_names("rte(gateway_requests_total[5m])") == ({"gateway_requests_total"}, {"rte"})
    assert metric_names("sum(up == 0)") == ({"up"}, set())


def test_alert_expressions_name_only_exported_metrics() -> None:
    problems = unknown_names([rule["expr"] for rule in alert_rules()])
    assert not problems, "\n".join(problems)


def test_dashboard_queries_name_only_exported_metrics() -> None:
    problems = unknown_names(dashboard_queries(dashboard()))
    assert not problems, "\n".join(problems)


def test_a_misspelled_metric_in_the_dashboard_is_caught() -> None:
    board = dashboard()
    target = query_panels(board)[0]["targets"][0]
    target["expr"] = target["expr"].replace("gateway_requests_total", "gateway_request_total")
    assert any("gateway_request_total" in problem for problem in unknown_names(dashboard_queries(board)))


# --- alert rules -----------------------------------------------------------------------------


def test_every_alert_has_a_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "GatewayDown",
        "GatewayBackendDown",
        "GatewayBackendErrorRatioHigh",
        "GatewayTimeToFirstTokenHigh",
        "GatewayPrivacyRejections",
        "GatewayAuditWriteFailing",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert rule.get("for"), rule["alert"]


def alerts(name: str, state: str, **labels: str) -> dict[str, Any]:
    """One expected ALERTS sample."""
    severity = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}[name]
    every = {"alertname": name, "alertstate": state, "severity": severity, **labels}
    return {"labels": "ALERTS{" + ",".join(f'{k}="{v}"' for k, v in sorted(every.items())) + "}", "value": 1}


def series(name: str, values: str) -> dict[str, str]:
    return {"series": name, "values": values}


def check(expr: str, at: str, *samples: dict[str, Any]) -> dict[str, Any]:
    return {"expr": expr, "eval_time": at, "exp_samples": list(samples)}


def test_alert_rules_fire_on_synthetic_series(tmp_path: Path) -> None:
    """`promtool test rules` over made-up series: each alert fires when it should and only then."""
    chat = 'endpoint="chat",model="m"'
    requests = "gateway_requests_total"
    private = 'gateway_privacy_decisions_total{privacy="private",reason="header"}'
    public = 'gateway_privacy_decisions_total{privacy="public",reason="default"}'
    ttft = "gateway_time_to_first_token_seconds_bucket"
    down = 'ALERTS{alertname=~"Gateway(Backend)?Down"}'
    tests = [
        {  # backend ollama-1 and the gateway's own scrape fail from t=60s; ollama-2 stays up
            "interval": "15s",
            "input_series": [
                series('gateway_backend_up{backend="ollama-1",instance="gw:8080"}', "1x3 0x12"),
                series('gateway_backend_up{backend="ollama-2",instance="gw:8080"}', "1x16"),
                series('up{job="phoenix-gateway",instance="gw:8080"}', "1x3 0x12"),
            ],
            "promql_expr_test": [
                check(down, "45s"),
                check(
                    down,
                    "90s",
                    alerts("GatewayBackendDown", "pending", backend="ollama-1"),
                    alerts("GatewayDown", "pending", instance="gw:8080", job="phoenix-gateway"),
                ),
                check(
                    down,
                    "3m",
                    alerts("GatewayBackendDown", "firing", backend="ollama-1"),
                    alerts("GatewayDown", "firing", instance="gw:8080", job="phoenix-gateway"),
                ),
            ],
        },
        {  # ollama-1: 0.1/s of 502 against 1/s of 200 (9%); ollama-2: 1/60 s of 500 (under 2%)
            "interval": "1m",
            "input_series": [
                series(f'{requests}{{{chat},backend="ollama-1",status="200"}}', "0+60x20"),
                series(f'{requests}{{{chat},backend="ollama-1",status="502"}}', "0+6x20"),
                series(f'{requests}{{{chat},backend="ollama-2",status="200"}}', "0+60x20"),
                series(f'{requests}{{{chat},backend="ollama-2",status="500"}}', "0+1x20"),
            ],
            "promql_expr_test": [
                check(
                    'ALERTS{alertname="GatewayBackendErrorRatioHigh"}',
                    "15m",
                    alerts("GatewayBackendErrorRatioHigh", "firing", backend="ollama-1"),
                )
            ],
        },
        {  # "slow": every first token between 10 and 30 s; "fast": all under 1 s
            "interval": "1m",
            "input_series": [
                series(f'{ttft}{{model="m",backend="slow",le="1"}}', "0x30"),
                series(f'{ttft}{{model="m",backend="slow",le="10"}}', "0x30"),
                series(f'{ttft}{{model="m",backend="slow",le="30"}}', "0+10x30"),
                series(f'{ttft}{{model="m",backend="slow",le="+Inf"}}', "0+10x30"),
                series(f'{ttft}{{model="m",backend="fast",le="1"}}', "0+10x30"),
                series(f'{ttft}{{model="m",backend="fast",le="10"}}', "0+10x30"),
                series(f'{ttft}{{model="m",backend="fast",le="30"}}', "0+10x30"),
                series(f'{ttft}{{model="m",backend="fast",le="+Inf"}}', "0+10x30"),
            ],
            "promql_expr_test": [
                check('ALERTS{alertname="GatewayTimeToFirstTokenHigh",alertstate="firing"}', "8m"),
                check(
                    'ALERTS{alertname="GatewayTimeToFirstTokenHigh"}',
                    "20m",
                    alerts("GatewayTimeToFirstTokenHigh", "firing", backend="slow"),
                ),
            ],
        },
        {  # 0.1/s of 403 while requests are classified private
            "interval": "1m",
            "input_series": [
                series(f'{requests}{{{chat},backend="",status="403"}}', "0+6x20"),
                series(private, "0+6x20"),
            ],
            "promql_expr_test": [
                check(
                    'ALERTS{alertname="GatewayPrivacyRejections"}',
                    "15m",
                    alerts("GatewayPrivacyRejections", "firing"),
                )
            ],
        },
        {  # one audit record lost at 3m: the alert fires a minute later, and ends once it is 5m old
            "interval": "1m",
            "input_series": [series("gateway_audit_write_failures_total", "0 0 0 1x10")],
            "promql_expr_test": [
                check('ALERTS{alertname="GatewayAuditWriteFailing"}', "2m"),
                check(
                    'ALERTS{alertname="GatewayAuditWriteFailing"}',
                    "5m",
                    alerts("GatewayAuditWriteFailing", "firing"),
                ),
                check('ALERTS{alertname="GatewayAuditWriteFailing"}', "10m"),
            ],
        },
        {  # the same 403s with public traffic only: keys refused a model, no privacy alert
            "interval": "1m",
            "input_series": [
                series(f'{requests}{{{chat},backend="",status="403"}}', "0+6x20"),
                series(public, "0+6x20"),
            ],
            "promql_expr_test": [check("ALERTS", "15m")],
        },
    ]
    path = tmp_path / "alerts-test.yml"
    unit = {"rule_files": [str(ALERTS)], "evaluation_interval": "15s", "tests": tests}
    path.write_text(yaml.safe_dump(unit))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------------------------


def test_dashboard_identity_and_variables() -> None:
    board = dashboard()
    assert (board["uid"], board["title"]) == ("phoenix-gateway", "Phoenix Gateway")
    assert board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("backend", "model"):
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        assert LABEL_VALUES.match(query) and query.rstrip(") ").endswith(name), query
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_every_panel_has_a_datasource_and_queries() -> None:
    board = dashboard()
    panels = query_panels(board)
    assert len(panels) >= 10
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"].strip()
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_dashboard_covers_every_metric() -> None:
    used = set().union(*(metric_names(query)[0] for query in dashboard_queries(dashboard())))
    # a histogram counts as covered by its _bucket series
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported_names()}
    covered = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families <= covered, sorted(families - covered)


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["access"]) == ("prometheus", "proxy")
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "phoenix-gateway.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]
