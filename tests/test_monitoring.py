"""The monitoring files of clusters/monitoring/ agree with the metrics the code exports.

Fast: every PromQL query of the Grafana dashboard names only gauges that `isosweep.sweep.monitoring`
defines (as Ray exports them, `ray_` + name) or metrics that Ray's own dashboards chart, and filters and
groups isosweep gauges only by their tag keys; every gauge is charted; the scrape config reads the file
Ray writes; the PodMonitor selects the pods the KubeRay manifests label. Live: a real Prometheus with the
shipped scrape config, scraping a real cluster while a sweep runs, is in tests/test_sweep.py
(`test_sweep_by_address_puts_a_trials_ranks_on_different_nodes`), to share that sweep's few minutes.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml
from support.prometheus_server import DASHBOARD, MONITORING, SCRAPE_CONFIG, dashboard_queries, label_values_selector

from isosweep.sweep import monitoring

REPO = Path(__file__).resolve().parents[1]
PODMONITOR = MONITORING / "podmonitor.yaml"
KUBERAY = [REPO / "clusters" / "kuberay" / "raycluster.yaml", REPO / "clusters" / "kuberay" / "rayjob.yaml"]

# PromQL words that are not metric names (aggregations and functions are told apart by their "(")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, label lists, ranges, strings and Grafana
    variables removed; a word followed by "(" is a function)."""
    selector = label_values_selector(promql)
    s = selector if selector is not None else promql
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = _LABEL_LISTS.sub("", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\$\{?\w+\}?", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", s):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def selector_labels(promql: str) -> dict[str, set[str]]:
    """metric name -> the label names its {...} matchers use."""
    out: dict[str, set[str]] = {}
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", promql):
        out.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
    return out


def test_metric_name_extraction_from_promql():
    q = ('sum by (trial, metric) (ray_isosweep_eval_samples_done{sweep=~"$sweep",trial=~"$trial"}) / '
         'sum by (trial, metric) (ray_isosweep_eval_samples_planned{sweep=~"$sweep"}) * 1024 * 1e3 == 1')
    assert metric_names(q) == {"ray_isosweep_eval_samples_done", "ray_isosweep_eval_samples_planned"}
    assert metric_names('label_values(ray_isosweep_train_step{sweep=~"$sweep"}, trial)') == {"ray_isosweep_train_step"}
    assert metric_names("max_over_time(up[5m]) or vector(0)") == {"up"}
    assert selector_labels('x{a="1", b=~"2"} + y{c!="3"}') == {"x": {"a", "b"}, "y": {"c"}}


def _ray_dashboard_exprs() -> list[str]:
    """Every PromQL expression of the Grafana dashboards Ray itself generates (the pinned Ray's panel modules)."""
    import ray.dashboard.modules.metrics.dashboards as pkg
    from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig

    exprs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.endswith("_panels"):
            for obj in vars(importlib.import_module(f"{pkg.__name__}.{info.name}")).values():
                if isinstance(obj, DashboardConfig):
                    for panel in obj.panels + [p for row in obj.rows for p in row.panels]:
                        exprs += [t.expr.replace("{global_filters}", "").replace("{{", "{").replace("}}", "}") for t in panel.targets]
    assert len(exprs) > 100, "Ray's dashboard panels moved: update this helper"
    return exprs


def test_dashboard_queries_name_only_exported_metrics_and_their_tags():
    ours = {monitoring.exported_name(name): tags for name, (_, tags) in monitoring.GAUGES.items()}
    rays = set().union(*(metric_names(e) for e in _ray_dashboard_exprs()))
    queries = dashboard_queries()
    assert len(queries) >= 20
    charted = set()
    for title, query in queries:
        names = metric_names(query)
        assert names, f"{title}: no metric in {query!r}"
        unknown = {n for n in names if n not in ours and n not in rays}
        assert not unknown, f"{title}: {sorted(unknown)} is neither an isosweep gauge (monitoring.GAUGES) nor charted by Ray's own dashboards"
        for name, labels in selector_labels(query).items():
            if name in ours:
                assert labels <= set(ours[name]), f"{title}: {name} has no tag(s) {sorted(labels - set(ours[name]))}"
        if names <= set(ours):  # grouping labels of isosweep-only queries are tags of the gauges grouped
            tags = set().union(*(ours[n] for n in names))
            for _, labels in _LABEL_LISTS.findall(query):
                grouped = {lab.strip() for lab in labels.split(",") if lab.strip()}
                assert grouped <= tags, f"{title}: groups by {sorted(grouped - tags)}, not a tag of {sorted(names)}"
        charted |= names
    assert set(ours) <= charted, f"gauges no panel charts: {sorted(set(ours) - charted)}"
    assert charted & rays, "no panel of Ray's own metrics"


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "sweep", "trial"} <= variables
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert all(0 <= panel["gridPos"][k] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24 for k in ("x", "y")), panel["title"]
        for ref in re.findall(r"\$\{?(\w+)", json.dumps(panel.get("targets", []))):
            assert ref in variables or ref.startswith("__"), f"{panel['title']}: unknown variable ${ref}"


def test_scrape_config_reads_the_service_discovery_file_ray_writes():
    from ray._private import ray_constants

    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    (files,) = [sd["files"] for sd in job["file_sd_configs"]]
    # the pinned Ray writes <temp dir>/session_*/<this name> and links it from <temp dir>/<this name>
    assert files == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert config["global"]["scrape_interval"].endswith("s")


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(f"{doc['kind']} {name}", g["template"]) for name, g in groups]


def test_podmonitor_selects_the_ray_pods_of_both_kuberay_manifests():
    (pm,) = [d for d in yaml.safe_load_all(PODMONITOR.read_text()) if d]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    selector = pm["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    kuberay_sets = {"ray.io/is-ray-node": "yes"}  # KubeRay's own pod labels (it never overrides a user's label)
    templates = [t for path in KUBERAY for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] in ("RayCluster", "RayJob")
                 for t in _pod_templates(d)]
    assert len(templates) == 4
    for where, template in templates:
        labels = {**template.get("metadata", {}).get("labels", {}), **kuberay_sets}
        assert all(labels.get(k) == v for k, v in selector.items()), f"{where}: labels {labels} miss {selector}"
        named = {p.get("name"): p["containerPort"] for p in template["spec"]["containers"][0].get("ports", [])}
        assert ports <= set(named), f"{where}: no container port named {sorted(ports - set(named))}"
        assert all(named[p] == 8080 for p in ports), f"{where}: the metrics port is not Ray's 8080"
    relabeled = {r["targetLabel"] for e in pm["spec"]["podMetricsEndpoints"] for r in e.get("relabelings", [])}
    assert "ray_io_cluster" in relabeled  # Ray's own dashboards filter on it


def test_gauge_names_are_prometheus_names_with_the_prefix():
    for name in monitoring.GAUGES:  # `_total` is the suffix Prometheus reserves for counters
        assert re.fullmatch(r"isosweep_[a-z_]+", name) and not name.endswith("_total"), name


def _trial(trial_id: str, status: str, baseline: bool = False, **result):
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=trial_id, status=status, config={"baseline": baseline}, last_result=result)


def test_sweep_progress_publishes_states_bests_and_eta(monkeypatch):
    """The driver's callback turns Tune's trials into the sweep's gauges (the Ray sink recorded, not mocked away:
    `_set` is where a value leaves isosweep)."""
    from isosweep.sweep.callbacks import SweepProgress

    sent = []
    monkeypatch.setattr(monitoring, "_set", lambda name, value, tags: sent.append((name, float(value), tags)))
    progress = SweepProgress(5, 2, monitoring.SweepMetrics("demo-1", 5, ["fid", "ppl"]))
    trials = [_trial("a", "TERMINATED", baseline=True, fid=5.0, ppl=9.0), _trial("b", "RUNNING"), _trial("c", "ERROR"),
              _trial("d", "TERMINATED", fid=7.0, ppl=float("nan")), _trial("e", "PENDING")]
    progress.on_trial_start(0, trials, trials[1])
    progress.started["b"] -= 100  # b has run 100 s
    trials[1].last_result = {"fid": 4.0, "ppl": 3.0}  # b finishes; Tune has not set its status yet
    sent.clear()
    progress.on_trial_complete(0, trials, trials[1])
    got = {(name, tuple(sorted((k, v) for k, v in tags.items() if k != "sweep"))): value for name, value, tags in sent}
    assert all(tags["sweep"] == "demo-1" for _, _, tags in sent)
    states = {dict(k[1])["state"]: v for k, v in got.items() if k[0] == monitoring.SWEEP_TRIALS}
    assert states == {"done": 3, "failed": 1, "running": 0, "pending": 1}  # 5 planned: e is pending
    assert got[(monitoring.SWEEP_PLANNED, ())] == 5
    assert got[(monitoring.SWEEP_BEST, (("objective", "fid"),))] == 4.0  # b's, below the baseline a's 5.0
    assert got[(monitoring.SWEEP_BEST, (("objective", "ppl"),))] == 3.0  # d's NaN is no value
    assert got[(monitoring.SWEEP_BASELINE, (("objective", "fid"),))] == 5.0
    trial_values = {(dict(k[1])["trial"], dict(k[1])["objective"]): v for k, v in got.items() if k[0] == monitoring.TRIAL_OBJECTIVE}
    assert trial_values == {("a", "fid"): 5.0, ("a", "ppl"): 9.0, ("b", "fid"): 4.0, ("b", "ppl"): 3.0, ("d", "fid"): 7.0}
    assert got[(monitoring.SWEEP_ETA, ())] == pytest.approx(100.0, abs=1.0)  # one left, queued: one mean duration
    sent.clear()
    trials[4].status = "TERMINATED"
    progress.on_experiment_end(trials)
    assert (monitoring.SWEEP_ETA, 0.0, {"sweep": "demo-1"}) in sent


def test_eval_progress_marks_the_metric_running_until_done(monkeypatch):
    sent = []
    monkeypatch.setattr(monitoring, "_set", lambda name, value, tags: sent.append((name, float(value), tags["metric"], tags["rank"])))
    report = monitoring.EvalProgress("demo-1", "t1", rank=1)
    report("ppl", 0, 4)
    report("ppl", 4, 4)
    running = [(v, m, r) for n, v, m, r in sent if n == monitoring.EVAL_RUNNING]
    assert running == [(1.0, "ppl", "1"), (0.0, "ppl", "1")]
    assert [(n, v) for n, v, _, _ in sent if n != monitoring.EVAL_RUNNING][-2:] == [(monitoring.EVAL_PLANNED, 4.0), (monitoring.EVAL_DONE, 4.0)]
