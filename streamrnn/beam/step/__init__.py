"""StatefulInference's internals, one concern each: ``intake`` (validation, one copy per event), ``clock`` (event
time in integer micros), ``apply`` (dedupe, order, TTL, batched ORT calls), ``store`` (per-shard state as a delta
log with a verified cache), ``pairing`` (next-event fields), ``stateful`` (the timers), ``outputs`` (output blocks
or records), ``counters`` (Beam counters and Prometheus), ``savepoint`` (snapshot sets), ``worker_check``."""
