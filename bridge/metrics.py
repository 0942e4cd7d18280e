"""Prometheus metrics, read from the service's own counters at scrape time.

A custom collector rather than prometheus-client counters updated on every poll: the hot path
stays free of metric calls, and a scrape (every 15-60 s) costs one walk over the devices.
Labels are `device` and `link` only (low cardinality: no point, topic or error text), values
in base units (seconds, bytes), counters end in `_total`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from bridge.service import Service


class ServiceCollector(Collector):
    """Exposes a Service's counters in the Prometheus text format."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        labels = ["device", "link"]
        polls = CounterMetricFamily("m2m_polls", "Poll cycles started", labels=labels)
        failed = CounterMetricFamily("m2m_poll_failures", "Poll cycles that failed",
                                     labels=labels)
        failures = CounterMetricFamily("m2m_request_failures", "Failed requests by kind",
                                       labels=[*labels, "kind"])
        requests = CounterMetricFamily("m2m_requests", "Modbus read requests", labels=labels)
        registers = CounterMetricFamily("m2m_registers_read", "Registers or bits read",
                                        labels=labels)
        bad = CounterMetricFamily("m2m_bad_values", "Decoded values that could not be published",
                                  labels=labels)
        up = GaugeMetricFamily("m2m_device_up", "1 while the device answers", labels=labels)
        for name, poller in list(service.pollers.items()):
            key = [name, poller.device.link]
            stats = poller.stats
            polls.add_metric(key, stats.polls)
            failed.add_metric(key, stats.failed_polls)
            requests.add_metric(key, stats.requests)
            registers.add_metric(key, stats.registers)
            bad.add_metric(key, stats.bad_values)
            up.add_metric(key, 1.0 if poller.online else 0.0)
            for kind, count in sorted(stats.failures.items()):
                failures.add_metric([*key, kind], count)
        yield from (polls, failed, failures, requests, registers, bad, up)

        buffer = service.buffer
        yield GaugeMetricFamily("m2m_buffer_messages", "Readings waiting to be published",
                                value=len(buffer))
        yield GaugeMetricFamily("m2m_buffer_bytes", "Topic and payload bytes waiting",
                                value=buffer.bytes)
        oldest = buffer.oldest_ts
        age = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        yield GaugeMetricFamily("m2m_buffer_oldest_age_seconds",
                                "Age of the oldest waiting reading", value=age)
        yield CounterMetricFamily("m2m_buffer_dropped", "Readings dropped by the buffer bounds",
                                  value=buffer.dropped)
        yield CounterMetricFamily("m2m_buffer_lost", "Readings neither stored nor delivered",
                                  value=buffer.lost)
        yield GaugeMetricFamily("m2m_buffer_disk_full", "1 while the disk is too full to store",
                                value=1.0 if buffer.disk_full else 0.0)

        publisher = service.publisher
        yield CounterMetricFamily("m2m_published", "Messages delivered to the broker",
                                  value=publisher.published)
        yield CounterMetricFamily("m2m_mqtt_reconnects", "Broker connection attempts after a loss",
                                  value=publisher.reconnects)
        yield GaugeMetricFamily("m2m_mqtt_connected", "1 while connected to the broker",
                                value=1.0 if publisher.connected.is_set() else 0.0)
        yield SummaryMetricFamily(
            "m2m_publish_latency_seconds", "From acquisition to delivery",
            count_value=publisher.latency_count, sum_value=publisher.latency_sum_ms / 1000,
        )


async def serve_metrics(service: Service, host: str, port: int) -> asyncio.Server:
    """Serve GET /metrics on host:port from the event loop.

    In the loop rather than prometheus-client's HTTP thread: collecting reads the pollers' and
    the buffer's state (SQLite included, whose connection belongs to this thread) without locks.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServiceCollector(service))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if request.split(b" ", 2)[:2] == [b"GET", b"/metrics"]:
                body, status = generate_latest(registry), b"200 OK"
            else:
                body, status = b"only GET /metrics here\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + CONTENT_TYPE_LATEST.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that hangs up or sends junk costs nothing
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
