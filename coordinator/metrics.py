"""Prometheus metrics of the coordinator (prometheus_client, an own registry; optional dependency)."""

from __future__ import annotations

import logging

__all__ = ["Metrics"]

log = logging.getLogger("fedmfs.coordinator.metrics")


class Metrics:
    """Rounds, uploads accepted/refused by reason, bytes per device and modality, round duration.
    Without prometheus_client every method is a no-op (and a warning says so once)."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            log.warning("prometheus_client is not installed: metrics disabled (pip install fedmfs[coordinator])")
            self.registry = None
            return
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("fedmfs_rounds_closed", "rounds closed", ["quorum"], registry=r)
        self.round = Gauge("fedmfs_round", "current round index", registry=r)
        self.accepted = Counter("fedmfs_uploads_accepted", "uploads accepted", ["modality"], registry=r)
        self.refused = Counter("fedmfs_uploads_refused", "uploads and messages refused", ["reason"], registry=r)
        self.bytes = Counter("fedmfs_upload_bytes", "accepted payload bytes", ["device", "modality"], registry=r)
        self.shapley = Gauge("fedmfs_modality_shapley", "a device's last reported Shapley value of a modality",
                             ["device", "modality"], registry=r)
        self.accuracy = Gauge("fedmfs_device_accuracy", "a device's last evaluated test accuracy (0..1)",
                              ["device"], registry=r)
        self.duration = Histogram("fedmfs_round_duration_seconds", "round duration (open to close)",
                                  buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.reports = Counter("fedmfs_reports", "device reports recorded", registry=r)
        self.errors = Counter("fedmfs_errors", "internal errors handled without crashing", ["where"], registry=r)
        self.online = Gauge("fedmfs_devices_online", "devices whose status is online", registry=r)
        self.ahead = Counter("fedmfs_devices_ahead", "fetches from a device holding a later round of this fleet "
                             "epoch than the coordinator (its ledger lost writes: run `recover`)", ["device"],
                             registry=r)
        self.reconnects = Counter("fedmfs_broker_reconnects", "reconnections to the broker (fleet state "
                                  "published again each time)", registry=r)

    def serve(self, port: int, host: str) -> None:
        if self.registry is None or not port:
            return
        from prometheus_client import start_http_server
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def __getattr__(self, name):   # only reached when prometheus_client is missing
        class _Nop:
            def labels(self, *a, **k):
                return self

            def inc(self, *a):
                pass

            def set(self, *a):
                pass

            def observe(self, *a):
                pass
        return _Nop()
