"""Store key layout: every object in a Flight store is named by a '/'-separated key.

| key                                   | what                                     |
|---------------------------------------|------------------------------------------|
| <run>/<partition>/<column>/<chunk>    | one column of one chunk of a partition   |
| <run>/weights/<version>/<shard>       | one shard of policy weights              |

Prefixes end in '/' so that dropping partition 1 never touches partition 10.
"""

from __future__ import annotations


def _part(name: str, value: str) -> str:
    # A '/' inside a part would make keys ambiguous and let one prefix drop match another's data.
    if not isinstance(value, str) or not value:
        raise ValueError(f"key part {name!r} must be a non-empty string, got {value!r}")
    if "/" in value:
        raise ValueError(f"key part {name!r} must not contain '/', got {value!r}")
    return value


def _index(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"key part {name!r} must be a non-negative integer, got {value!r}")
    return value


def partition_prefix(run: str, partition: int) -> str:
    """`<run>/<partition>/`: every column chunk of one partition."""
    return f"{_part('run', run)}/{_index('partition', partition)}/"


def column_key(run: str, partition: int, column: str, chunk: str) -> str:
    """`<run>/<partition>/<column>/<chunk>`: one column of one chunk."""
    return f"{partition_prefix(run, partition)}{_part('column', column)}/{_part('chunk', chunk)}"


def weights_prefix(run: str, version: int) -> str:
    """`<run>/weights/<version>/`: every shard of one policy version."""
    return f"{_part('run', run)}/weights/{_index('version', version)}/"


def weights_key(run: str, version: int, shard: int) -> str:
    """`<run>/weights/<version>/<shard>`: one shard of one policy version."""
    return f"{weights_prefix(run, version)}{_index('shard', shard)}"
