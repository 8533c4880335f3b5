"""Prometheus metrics: the catalogue, defined once (``catalogue``), its exporter for jobs (``export``) and its
wrapper for operator-API users (``operator``)."""
