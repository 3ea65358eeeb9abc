"""Prometheus text endpoint (``--metrics-addr HOST:PORT``, off by default).

A custom collector reads the daemon's stats dict on every scrape, so the daemon keeps plain
counters and nothing here touches its state. Served by prometheus_client on its own thread; pass
`trio_token` when `stats_fn` must run on the trio thread (e.g. it reads the journal's sqlite).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.config import parse_addr

log = logging.getLogger(__name__)

# stats key (as in `ckptfs status --json`) -> (metric name, type, help). Counters get "_total"
# appended by prometheus_client. Keys missing from (or None in) the stats dict are skipped.
METRICS: dict[str, tuple[str, str, str]] = {
    "dirty_files": ("ckptfs_dirty_files", "gauge", "Files being written or not yet closed"),
    "held_files": ("ckptfs_held_files", "gauge", "Files held back by a temporary name"),
    "durable_files": ("ckptfs_durable_files", "gauge", "Files whose content is in the bucket"),
    "stale_objects": ("ckptfs_stale_objects", "gauge", "Objects waiting to be deleted"),
    "uploaded_files_total": ("ckptfs_uploaded_files", "counter", "Files uploaded"),
    "copied_files_total": ("ckptfs_copied_files", "counter", "Renames done as server-side copies"),
    "deleted_objects_total": ("ckptfs_deleted_objects", "counter", "Objects deleted"),
    "drain_rate_bps": ("ckptfs_drain_rate_bytes_per_second", "gauge", "Recent upload rate"),
    "cache_size_bytes": ("ckptfs_cache_size_bytes", "gauge", "Configured cache size"),
    "evictable_bytes": ("ckptfs_cache_evictable_bytes", "gauge", "Clean cached bytes that can be evicted"),
    "dirty_bytes": ("ckptfs_dirty_bytes", "gauge", "Bytes written locally and not yet in the bucket"),
    "queued_files": ("ckptfs_queued_files", "gauge", "Files waiting to be uploaded"),
    "uploading_files": ("ckptfs_uploading_files", "gauge", "Files being uploaded now"),
    "uploaded_bytes_total": ("ckptfs_uploaded_bytes", "counter", "Bytes uploaded to the bucket"),
    "upload_errors_total": ("ckptfs_upload_errors", "counter", "Failed object-store requests"),
    "retries_total": ("ckptfs_retries", "counter", "Retried object-store requests"),
    "oldest_pending_age_s": ("ckptfs_oldest_pending_age_seconds", "gauge", "Age of the oldest pending write"),
    "newest_durable_age_s": ("ckptfs_newest_durable_age_seconds", "gauge",
                             "Age of the newest write that is durable in the bucket"),
    "newest_durable_checkpoint_age_s": ("ckptfs_newest_durable_checkpoint_age_seconds", "gauge",
                                        "Seconds since a checkpoint last became durable (since the mount if none has)"),
    "backpressure_seconds_total": ("ckptfs_backpressure_seconds", "counter",
                                   "Time writers were blocked on a full cache"),
    "cache_used_bytes": ("ckptfs_cache_used_bytes", "gauge", "Bytes used in the local cache"),
    "evictions_total": ("ckptfs_evictions", "counter", "Clean files evicted from the cache"),
    "drain_yielded_seconds_total": ("ckptfs_drain_yielded_seconds", "counter",
                                    "Time drain requests waited while applications wrote (FUSE first)"),
    "spare_data_files": ("ckptfs_spare_data_files", "gauge", "Empty data files made ahead for creates"),
    "creates_without_spare_total": ("ckptfs_creates_without_spare", "counter",
                                    "Creates that found no spare data file and made their own"),
    "backpressure_waits_total": ("ckptfs_backpressure_waits", "counter", "Writes that waited for cache space"),
    "backpressure_writers_waiting": ("ckptfs_backpressure_writers_waiting", "gauge",
                                     "Writers waiting for cache space now"),
    "cache_overflows_total": ("ckptfs_cache_overflows", "counter",
                              "Writes let past a full cache that only files being written filled"),
    "failsafe": ("ckptfs_failsafe", "gauge", "1 while the gateway is in failsafe mode"),
}

# Status keys that hold a reason (a string) or None: exported as 1 or 0.
FLAGS = {"failsafe"}

ALIASES = {"upload_errors_total": "errors_total"}  # the daemon's status calls it errors_total


class StatsCollector(Collector):
    """Turns one `stats_fn()` dict into metric families; missing keys are skipped."""

    def __init__(self, stats_fn: Callable[[], dict[str, Any]], trio_token: Any = None):
        self.stats_fn = stats_fn
        self.trio_token = trio_token

    def _read(self) -> dict[str, Any]:
        if self.trio_token is None:
            return self.stats_fn()
        import trio

        return trio.from_thread.run_sync(self.stats_fn, trio_token=self.trio_token)

    def collect(self) -> Iterator[Any]:
        try:
            stats = self._read()
        except Exception:  # a broken stats source must not break the scrape
            log.exception("metrics: stats function failed")
            stats = None
        up = GaugeMetricFamily("ckptfs_stats_up", "1 if the daemon's statistics could be read")
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is None:
            return
        for key, (name, kind, doc) in METRICS.items():
            value = stats.get(key)
            if key in FLAGS:
                value = int(bool(value))  # the status holds the reason (a string) or None
            if value is None and key in ALIASES:
                value = stats.get(ALIASES[key])
            if value is None:
                continue
            metric_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield metric_class(name, doc, value=float(value))
        ops = stats.get("fuse_ops_total")
        if ops:
            family = CounterMetricFamily("ckptfs_fuse_ops", "FUSE requests by operation", labels=["op"])
            for op, count in sorted(ops.items()):
                family.add_metric([str(op)], float(count))
            yield family


def exported_names() -> set[str]:
    """Every metric name the exporter can serve (counters with their _total suffix)."""
    names = {name + ("_total" if kind == "counter" else "") for name, kind, _ in METRICS.values()}
    return names | {"ckptfs_stats_up", "ckptfs_fuse_ops_total"}


def start_metrics_server(
    addr: str, stats_fn: Callable[[], dict[str, Any]], *, trio_token: Any = None
) -> tuple[Any, Any]:
    """Serve /metrics on `addr` ('HOST:PORT') in a daemon thread; returns (server, thread).

    With `trio_token` (trio.lowlevel.current_trio_token()), `stats_fn` runs on that trio thread.
    """
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats_fn, trio_token))
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
