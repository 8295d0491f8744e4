"""A Prometheus registry served over HTTP: the base of both daemons' metrics.

prometheus_client's own server answers `GET /metrics` in a thread of its own, so a
scrape never waits for the daemon's event loop (what it reads from there, it asks
for: see `controller.scrape`).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class ServedRegistry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, address: str) -> str:
        """Starts the HTTP endpoint on host:port (port 0 picks one); returns the bound address."""
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(int(port), host, registry=self.registry)
        return f"{host}:{self._server.server_port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
