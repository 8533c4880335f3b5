"""Writes deploy/grafana/streamrnn.json, the streamrnn Grafana dashboard (run: python deploy/grafana/generate.py).

Every panel's PromQL uses only catalogued metrics (streamrnn/metrics/catalogue.py), filtered by the
``$job`` variable; ``$__rate_interval`` is Grafana's rate window.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'job=~"$job"'
RI = "$__rate_interval"
LN2 = "0.6931471805599453"


def _q(h: float, metric: str, by: str = "") -> str:
    return f"histogram_quantile({h}, sum by (le{by}) (rate({metric}_bucket{{{J}}}[{RI}])))"


# (title, unit, kind, [(expr, legend)], width)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], int]] = [
    ("Throughput (events/s)", "ops", "timeseries", [
        (f"sum by (job) (rate(streamrnn_events_in_total{{{J}}}[{RI}]))", "{{job}} in"),
        (f"sum by (job) (rate(streamrnn_events_applied_total{{{J}}}[{RI}]))", "{{job}} applied")], 12),
    ("Model calls (calls/s) and events per call (p50)", "short", "timeseries", [
        (f"sum by (job) (rate(streamrnn_batches_total{{{J}}}[{RI}]))", "{{job}} calls/s"),
        (_q(0.5, "streamrnn_batch_events", ", job"), "{{job}} events/call p50")], 12),
    ("Batch latency (one model call)", "s", "timeseries", [
        (_q(0.5, "streamrnn_batch_latency_seconds", ", job"), "{{job}} p50"),
        (_q(0.9, "streamrnn_batch_latency_seconds", ", job"), "{{job}} p90"),
        (_q(0.99, "streamrnn_batch_latency_seconds", ", job"), "{{job}} p99")], 12),
    ("Latency per event (call time / events)", "s", "timeseries", [
        (_q(0.5, "streamrnn_event_latency_seconds", ", job"), "{{job}} p50"),
        (_q(0.99, "streamrnn_event_latency_seconds", ", job"), "{{job}} p99")], 12),
    ("Active keys", "short", "timeseries", [
        (f"sum by (job) (streamrnn_active_keys{{{J}}})", "{{job}}")], 8),
    ("State bytes", "bytes", "timeseries", [
        (f"sum by (job) (streamrnn_state_bytes{{{J}}})", "{{job}} held"),
        (f"sum by (job) (rate(streamrnn_state_written_bytes_total{{{J}}}[{RI}]))", "{{job}} written/s")], 8),
    ("Late, duplicate and expired (events/s)", "ops", "timeseries", [
        (f'sum by (job, reason) (rate(streamrnn_dead_letters_total{{{J}, reason=~"late|duplicate"}}[{RI}]))',
         "{{job}} {{reason}}"),
        (f"sum by (job) (rate(streamrnn_expired_keys_total{{{J}}}[{RI}]))", "{{job}} expired keys")], 8),
    ("Dead letters by reason (events/s)", "ops", "timeseries", [
        (f"sum by (job, reason) (rate(streamrnn_dead_letters_total{{{J}}}[{RI}]))", "{{job}} {{reason}}")], 12),
    ("Dead-letter share: dead / (dead + applied)", "percentunit", "timeseries", [
        (f"sum by (job) (rate(streamrnn_dead_letters_total{{{J}}}[{RI}])) / "
         f"((sum by (job) (rate(streamrnn_dead_letters_total{{{J}}}[{RI}])) + "
         f"sum by (job) (rate(streamrnn_events_applied_total{{{J}}}[{RI}]))) > 0)", "{{job}}")], 12),
    ("Online loss (bits/event; bits/char for a byte LM) vs training", "short", "timeseries", [
        (f"sum by (job, model_version) (rate(streamrnn_online_loss_nats_total{{{J}}}[{RI}])) / "
         f"sum by (job, model_version) (rate(streamrnn_online_scored_events_total{{{J}}}[{RI}])) / {LN2}",
         "{{job}} {{model_version}} online"),
        (f"max by (job, model_version) (streamrnn_model_reference_loss_nats{{{J}}}) / {LN2}",
         "{{job}} {{model_version}} training (validation)")], 12),
    ("Forecasts: live interval coverage (scored events inside the previous interval)", "percentunit",
     "timeseries", [
        (f"sum by (job, model_version) (rate(streamrnn_online_in_interval_80_total{{{J}}}[{RI}])) / "
         f"clamp_min(sum by (job, model_version) (rate(streamrnn_online_scored_events_total{{{J}}}[{RI}])), 1e-9)",
         "{{job}} {{model_version}} 80%"),
        (f"sum by (job, model_version) (rate(streamrnn_online_in_interval_95_total{{{J}}}[{RI}])) / "
         f"clamp_min(sum by (job, model_version) (rate(streamrnn_online_scored_events_total{{{J}}}[{RI}])), 1e-9)",
         "{{job}} {{model_version}} 95%"),
        (f"sum by (job, model_version) (rate(streamrnn_online_abs_error_percent_total{{{J}}}[{RI}])) / "
         f"clamp_min(sum by (job, model_version) (rate(streamrnn_online_scored_events_total{{{J}}}[{RI}])), 1e-9)",
         "{{job}} {{model_version}} MAE of the median")], 12),
    ("Carried-state health: share of active keys in bad health (health flag/heal)", "percentunit", "timeseries", [
        (f"sum by (job) (streamrnn_health_bad_keys{{{J}}}) / clamp_min(sum by (job) (streamrnn_active_keys{{{J}}}), 1)",
         "{{job}} bad health")], 12),
    ("Health resets: states replaced by their fresh shadow's (health heal, keys/s)", "ops", "timeseries", [
        (f"sum by (job) (rate(streamrnn_health_resets_total{{{J}}}[{RI}]))", "{{job}} heals/s")], 12),
    ("Target health per job (1 = /metrics scraped, 0 = down)", "short", "timeseries", [
        (f"max by (job, instance) (last_over_time(streamrnn_cuda_expected{{{J}}}[1d]) * 0) "
         "+ on (instance) group_left () max by (instance) (up)", "{{job}} {{instance}}")], 12),
    ("Events applied in the last 15 min (0 after a steady hour: stalled)", "short", "timeseries", [
        (f"sum by (job) (increase(streamrnn_events_applied_total{{{J}}}[15m]))", "{{job}}")], 12),
    ("Model version and provider in use", "short", "table", [
        (f"max by (job, model, model_version, task, provider) (streamrnn_model_info{{{J}}})", "")], 12),
    ("CUDA expected / state work", "short", "timeseries", [
        (f"max by (job) (streamrnn_cuda_expected{{{J}}})", "{{job}} CUDA expected"),
        (f"sum by (job) (rate(streamrnn_flushes_total{{{J}}}[{RI}]))", "{{job}} flushes/s"),
        (f"sum by (job) (rate(streamrnn_state_compactions_total{{{J}}}[{RI}]))", "{{job}} compactions/s"),
        (f"sum by (job) (rate(streamrnn_state_rebuilds_total{{{J}}}[{RI}]))", "{{job}} rebuilds/s"),
        (f"sum by (job) (rate(streamrnn_model_switches_total{{{J}}}[{RI}]))", "{{job}} model switches/s"),
        (f"sum by (job) (rate(streamrnn_model_update_resets_total{{{J}}}[{RI}]))", "{{job}} update resets/s")],
     12),
]


def dashboard() -> dict:
    panels, x, y, row_h = [], 0, 0, 8
    for i, (title, unit, kind, targets, w) in enumerate(PANELS, start=1):
        if x + w > 24:
            x, y = 0, y + row_h
        panel = {"id": i, "type": kind, "title": title, "datasource": DS,
                 "gridPos": {"x": x, "y": y, "w": w, "h": row_h},
                 "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {},
                 "targets": [{"refId": chr(ord("A") + k), "datasource": DS, "expr": e, "legendFormat": leg,
                              **({"format": "table", "instant": True} if kind == "table" else {})}
                             for k, (e, leg) in enumerate(targets)]}
        panels.append(panel)
        x += w
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": "streamrnn", "uid": "streamrnn", "tags": ["streamrnn"], "timezone": "utc",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "job", "type": "query", "datasource": DS, "label": "job", "includeAll": True, "multi": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2,
             "query": {"query": "label_values(streamrnn_events_in_total, job)", "refId": "jobs"},
             "definition": "label_values(streamrnn_events_in_total, job)"}]},
        "panels": panels,
    }


def main() -> int:
    out = Path(__file__).with_name("streamrnn.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
