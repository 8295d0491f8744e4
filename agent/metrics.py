"""The agent's Prometheus metrics, in their own registry, served over HTTP."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from agent.fencing import NodeFence
from volkin.served import ServedRegistry

_LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics(ServedRegistry):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.operations = Counter(
            "volkin_agent_operations", "gRPC calls by operation and result (ok or status code)",
            ["op", "result"], registry=r)
        self.latency = Histogram(
            "volkin_agent_operation_seconds", "Time to answer a gRPC call, by operation",
            ["op"], buckets=_LATENCY_BUCKETS, registry=r)
        self.read_bytes = Counter(
            "volkin_agent_read_bytes", "Bytes read from extents for Read calls", registry=r)
        self.written_bytes = Counter(
            "volkin_agent_written_bytes", "Bytes written to extents by Write calls", registry=r)
        self.copied_bytes = Counter(
            "volkin_agent_copied_bytes", "Bytes copied into extents by Copy calls, by source "
            "(local extent or peer agent)", ["source"], registry=r)
        self.extents = Gauge("volkin_agent_extents", "Live extents on this agent", registry=r)
        self.epoch_refusals = Counter(
            "volkin_agent_epoch_refusals", "Mutations refused for carrying an older fencing epoch",
            registry=r)
        self.fencing_epoch = Gauge(
            "volkin_agent_fencing_epoch", "The node's fencing epoch: mutations carrying a "
            "lower one are refused", registry=r)
        self.validity_seconds = Gauge(
            "volkin_agent_write_validity_seconds", "Seconds the agent may still admit "
            "mutations without another successful etcd renewal; 0 means it refuses them",
            registry=r)

    def watch_fence(self, fence: NodeFence) -> None:
        """The fencing gauges read the fence when scraped: nothing on the write path."""
        self.fencing_epoch.set_function(lambda: fence.epoch)
        self.validity_seconds.set_function(fence.validity.remaining)
