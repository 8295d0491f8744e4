"""volkin: the package shared by the agent, the controller and the CLI.

It holds the pure map engine (`volkin.engine`), the generated gRPC stubs
(`volkin.api.v1`) and the small helpers both daemons use.
"""

__version__ = "0.1.0"
