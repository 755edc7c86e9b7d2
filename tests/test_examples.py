"""The examples/ folder stays in step with the code: the Grafana dashboard queries only metrics
the server exports, and describes every panel it has."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nlora_serve.serving.metrics import ServerMetrics

EXAMPLES = Path(__file__).parents[1] / "examples"


def _exported_sample_names() -> set[str]:
    metrics = ServerMetrics(lambda: {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0,
                                     "preemptions": 0},
                            lambda: (0, 0), per_tenant=True)
    timer = metrics.request("http", "acme")  # a tenant's series appear at its first request
    timer.tokens(1)
    timer.tokens(1)
    timer.finish()
    timer.ended("finished")
    metrics.reject("tenant_quota", "http", "acme")
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_grafana_dashboard_queries_only_exported_metrics_and_describes_each_panel():
    dashboard = json.loads((EXAMPLES / "grafana" / "nlora-serve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {name for e in exprs for name in re.findall(r"\bnlora_\w+", e)}
    exported = _exported_sample_names()
    assert queried and queried <= exported, sorted(queried - exported)
    # every gauge, counter and histogram of the server is on some panel, the per-tenant ones included
    families = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in queried}
    assert families == shown, sorted(families ^ shown)
    readme = (EXAMPLES / "grafana" / "README.md").read_text()
    described = set(re.findall(r"^\| ([^|]+?) \|", readme, flags=re.M)) - {"panel", "---"}
    assert described == {p["title"] for p in dashboard["panels"]}
