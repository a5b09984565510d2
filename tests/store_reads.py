"""Counting what a store hands out: the bytes of round adapter objects read through the real store's two read
paths (ranged reads and streams), for tests that check a pull or a shard fetched only what it needed."""

from __future__ import annotations


def count_adapter_reads(store) -> list[int]:
    """From now on, ``[bytes]`` of round adapter objects (``-adapter-`` keys) ``store`` hands out."""
    count = [0]
    get_range, stream = store.get_range, store.stream

    def counted_range(key, start, end):
        data = get_range(key, start, end)
        count[0] += len(data) if "-adapter-" in key else 0
        return data

    def counted_stream(key, start=0, end=None):
        for chunk in stream(key, start, end):
            count[0] += len(chunk) if "-adapter-" in key else 0
            yield chunk

    store.get_range, store.stream = counted_range, counted_stream
    return count
