"""The data plane: Arrow Flight column stores holding rollout columns and policy weights.

Actors exchange only keys and locations over NATS (`asyncflow.wire.ChunkRef`); the bulk data is
put to and read from a `ColumnStoreServer` through a `StoreClient`.
"""

from typing import TYPE_CHECKING, Any

from flight_store.client import StoreClient
from flight_store.columns import float_lists, to_float_lists, to_int_lists, token_lists
from flight_store.keys import column_key, partition_prefix, weights_key, weights_prefix

if TYPE_CHECKING:  # visible to type checkers; imported on first use at run time (see __getattr__)
    from flight_store.server import ColumnStoreServer, serve
    from flight_store.weights import drop_weights, get_weights, put_weights, weights_table_batches

# Imported lazily: the weights helpers need torch (slow to import, large), and importing the server
# module here would load it twice under `python -m flight_store.server`.
_LAZY = {
    "ColumnStoreServer": "flight_store.server",
    "serve": "flight_store.server",
    "drop_weights": "flight_store.weights",
    "get_weights": "flight_store.weights",
    "put_weights": "flight_store.weights",
    "weights_table_batches": "flight_store.weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flight_store' has no attribute {name!r}")


__all__ = [
    "ColumnStoreServer",
    "StoreClient",
    "column_key",
    "drop_weights",
    "float_lists",
    "get_weights",
    "partition_prefix",
    "put_weights",
    "serve",
    "to_float_lists",
    "to_int_lists",
    "token_lists",
    "weights_key",
    "weights_prefix",
    "weights_table_batches",
]
