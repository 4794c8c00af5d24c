"""deploy/grafana/: the dashboard parses, every panel queries, and every metric and label its PromQL names
is one that server/metrics.py defines; the provisioning points Grafana at the compose Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "seqserve.json"

METRIC_NAME = re.compile(r"\bseqserve_[a-z_]+")
# A metric and its label matchers, if any: seqserve_x{model=~"$model", code!="OK"}
SELECTOR = re.compile(r"\b(seqserve_[a-z_]+)\s*(?:\{([^}]*)\})?")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")
MODEL_MATCHER = 'model=~"$model"'
# Grafana's variables, replaced by PromQL that parses, for promtool.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$model": ".*"}


class Defined:
    """What server/metrics.py exports: exposed sample names -> (type, label names)."""

    def __init__(self):
        metrics = Metrics(CollectorRegistry())
        wrappers = {w.describe()[0].name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
        families = {family.name: family.type for family in metrics.registry.collect()}
        assert set(wrappers) == set(families), "every registered collector is an attribute of Metrics"
        self.types: dict[str, str] = {}
        self.labels: dict[str, tuple[str, ...]] = {}
        for family_name, kind in families.items():
            # prometheus_client drops a counter's `_total` from the family name; samples carry it.
            name = family_name + "_total" if kind == "counter" else family_name
            self.types[name] = kind
            self.labels[name] = tuple(wrappers[family_name]._labelnames)

    def resolve(self, referenced: str) -> str | None:
        """The defined metric a PromQL name refers to (a histogram's series map to the histogram)."""
        if referenced in self.types:
            return referenced
        for suffix in HISTOGRAM_SUFFIXES:
            base = referenced.removesuffix(suffix)
            if base != referenced and self.types.get(base) == "histogram":
                return base
        return None


@pytest.fixture(scope="module")
def defined() -> Defined:
    return Defined()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def query_panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data (rows are layout only), including panels nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels += panel.get("panels", [])
        else:
            panels.append(panel)
    return panels


def panel_queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, PromQL, legend format) for every target of every panel."""
    return [(panel["title"], target.get("expr", ""), target.get("legendFormat", ""))
            for panel in query_panels(dashboard) for target in panel.get("targets", [])]


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            out.append((f"variable ${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def test_dashboard_parses_with_a_stable_uid_and_a_sane_layout(dashboard):
    assert dashboard["uid"] == "seqserve" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    names = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= names


def test_every_panel_has_a_query_and_a_description(dashboard):
    panels = query_panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has an empty query"
            assert target.get("refId"), panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} says nothing about what it shows"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_metric_named_is_defined_in_server_metrics(dashboard, defined):
    unknown = []
    for where, expr in [(title, expr) for title, expr, _ in panel_queries(dashboard)] + variable_queries(dashboard):
        names = METRIC_NAME.findall(expr)
        assert names or where.startswith("variable"), f"{where}: no seqserve metric in {expr!r}"
        unknown += [f"{where}: {name}" for name in names if defined.resolve(name) is None]
    assert not unknown, "metrics not defined in server/metrics.py:\n" + "\n".join(unknown)


def test_every_model_labelled_metric_is_filtered_by_the_model_variable(dashboard, defined):
    missing = []
    for title, expr, _ in panel_queries(dashboard):
        for name, matchers in SELECTOR.findall(expr):
            metric = defined.resolve(name)
            if metric and "model" in defined.labels[metric] and MODEL_MATCHER not in matchers:
                missing.append(f"{title}: {name}{{{matchers}}}")
    assert not missing, f"selectors without {MODEL_MATCHER}:\n" + "\n".join(missing)


def test_labels_used_exist_on_the_metrics_queried(dashboard, defined):
    """A misspelt label (`{{reasons}}`, `by (rcp)`) silently gives an empty legend or one merged series."""
    wrong = []
    for title, expr, legend in panel_queries(dashboard):
        metrics = {defined.resolve(name) for name in METRIC_NAME.findall(expr)} - {None}
        available = {label for metric in metrics for label in defined.labels[metric]}
        if any(defined.types[metric] == "histogram" for metric in metrics):
            available.add("le")
        used = set(LEGEND_LABEL.findall(legend))
        for _, matchers in SELECTOR.findall(expr):
            used |= set(MATCHER_LABEL.findall(matchers))
        for group in GROUPING.findall(expr):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        wrong += [f"{title}: {label}" for label in sorted(used - available)]
    assert not wrong, "labels the queried metrics do not have:\n" + "\n".join(wrong)


def test_dashboard_shows_every_metric_the_server_exports(dashboard, defined):
    """A metric added to server/metrics.py needs a panel (the provisioned dashboard shows every metric)."""
    shown = {defined.resolve(name) for _, expr, _ in panel_queries(dashboard) for name in METRIC_NAME.findall(expr)}
    assert not set(defined.types) - shown, f"metrics with no panel: {sorted(set(defined.types) - shown)}"


def test_histograms_are_read_through_rates_of_their_buckets(dashboard):
    """histogram_quantile over raw cumulative buckets gives a since-start figure, not a current one."""
    for title, expr, _ in panel_queries(dashboard):
        if "histogram_quantile" in expr:
            assert re.search(r"rate\(seqserve_[a-z_]+_bucket\{", expr), f"{title}: {expr}"
            assert re.search(r"by \([^)]*\ble\b", expr), f"{title}: quantile without `by (le, ...)`: {expr}"


def test_queries_parse_as_promql(dashboard, tmp_path):
    """promtool parses every query (Grafana's variables replaced) as a recording rule's expression."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`, from `make setup-system`)")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, (_, expr) in enumerate([(t, e) for t, e, _ in panel_queries(dashboard)]):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        lines += [f"      - record: seqserve:dashboard_query_{index}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_at_the_compose_prometheus_and_the_mounted_dashboards(dashboard):
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with tokenizers' huggingface_hub) reads it")
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["current"]["value"] == source["uid"], "the dashboard's default datasource is the provisioned one"

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "seqserve.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
