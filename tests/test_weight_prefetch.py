"""Weight prefetch (actors/weight_prefetch.py) against a real Flight store.

An announced version is downloaded in the background, so a later swap finds it in memory; only the
newest version is worth keeping; a version never announced is a clear, timed-out error; with
prefetch off the download happens on demand.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from actors.weight_prefetch import WeightPrefetcher
from asyncflow.errors import EngineError
from asyncflow.wire import WeightsEvent
from flight_store import StoreClient
from flight_store.weights import put_weights


def _announce(client: StoreClient, prefetcher: WeightPrefetcher, version: int, size: int = 1000) -> dict:
    tensors = {"w": torch.full((size,), float(version)), "b": torch.arange(3, dtype=torch.float32) + version}
    ref = put_weights(client, "prefetch-test", version, list(tensors.items()))
    prefetcher.announce(WeightsEvent(version=version, weights=ref, nbytes=0))
    return tensors


def test_announced_versions_are_fetched_in_the_background(flight_store_server):
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            prefetcher = WeightPrefetcher(client, prefetch=True)
            sent = _announce(client, prefetcher, 1)
            for _ in range(200):  # the download runs while "generation" goes on
                if prefetcher.prefetched_versions:
                    break
                await asyncio.sleep(0.01)
            assert prefetcher.prefetched_versions == 1
            fetched = await prefetcher.wait_for(1, timeout_s=5)
            assert fetched.version == 1 and fetched.exposed_fetch_s < 0.05  # nothing left to wait for
            assert all(torch.equal(fetched.tensors[name], tensor) for name, tensor in sent.items())

            # A newer announcement supersedes the older one; asking for v2 or less gives the newest.
            _announce(client, prefetcher, 2)
            _announce(client, prefetcher, 3)
            fetched = await prefetcher.wait_for(2, timeout_s=5)
            assert fetched.version == 3 and float(fetched.tensors["w"][0]) == 3.0
            _announce(client, prefetcher, 2)  # late, older: ignored
            assert prefetcher.announced.version == 3
            prefetcher.close()

    asyncio.run(scenario())


def test_without_prefetch_the_download_happens_on_demand(flight_store_server):
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            prefetcher = WeightPrefetcher(client, prefetch=False)
            _announce(client, prefetcher, 1)
            await asyncio.sleep(0.2)
            assert prefetcher.prefetched_versions == 0  # nothing moved before it was needed
            fetched = await prefetcher.wait_for(1, timeout_s=5)
            assert fetched.version == 1 and float(fetched.tensors["w"][0]) == 1.0

    asyncio.run(scenario())


def test_a_version_never_announced_times_out_with_a_clear_error(flight_store_server):
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            prefetcher = WeightPrefetcher(client, prefetch=True, label="rollout-7")
            _announce(client, prefetcher, 1)
            with pytest.raises(EngineError, match="rollout-7: policy version 2 not announced within 0.3 s"):
                await prefetcher.wait_for(2, timeout_s=0.3)
            prefetcher.close()

    asyncio.run(scenario())


def test_an_announcement_that_waits_for_its_version_is_woken(flight_store_server):
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            prefetcher = WeightPrefetcher(client, prefetch=True)
            waiter = asyncio.create_task(prefetcher.wait_for(1, timeout_s=10))
            await asyncio.sleep(0.1)
            assert not waiter.done()
            _announce(client, prefetcher, 1)
            fetched = await asyncio.wait_for(waiter, timeout=10)
            assert fetched.version == 1
            prefetcher.close()

    asyncio.run(scenario())


def test_a_download_superseded_mid_way_gives_the_newer_version(flight_store_server):
    """A newer announcement cancels the older download; a swap waiting on it takes the newer one."""
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            prefetcher = WeightPrefetcher(client, prefetch=True)
            _announce(client, prefetcher, 1, size=4_000_000)  # 16 MB: still downloading below
            waiter = asyncio.create_task(prefetcher.wait_for(1, timeout_s=30))
            await asyncio.sleep(0)
            _announce(client, prefetcher, 2)
            fetched = await asyncio.wait_for(waiter, timeout=30)
            assert fetched.version == 2 and float(fetched.tensors["w"][0]) == 2.0
            prefetcher.close()

    asyncio.run(scenario())
