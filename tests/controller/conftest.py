"""Controller tests use real agents and a real etcd, as the agent tests do."""

from tests.agent.conftest import start_agent
from tests.support.etcd import etcd_server

__all__ = ["etcd_server", "start_agent"]
