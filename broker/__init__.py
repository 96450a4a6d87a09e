"""The control plane: the embedded NATS server, connections, and the run's JetStream topology."""

from broker.connection import connect
from broker.names import RunNames
from broker.server import EmbeddedNatsServer
from broker.topology import delete_topology, ensure_topology

__all__ = ["EmbeddedNatsServer", "RunNames", "connect", "delete_topology", "ensure_topology"]
