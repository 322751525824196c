"""The latency histogram the reactors keep per virtqueue, as ``vhost_get_queue_stats`` reports it.

``latency_histogram`` is a list of counts; bucket ``b`` counts the requests that took at least
2^b and less than 2^(b+1) ticks of the reactor clock (``tick_rate`` ticks per second).  The
Prometheus exporter turns the buckets into a cumulative histogram with these upper bounds, and
vhostd-top reads quantiles off them.
"""

from __future__ import annotations


def bucket_upper_bound_s(bucket: int, tick_rate: int) -> float:
    """Seconds below which every request counted in ``bucket`` took."""
    return (2 ** (bucket + 1)) / tick_rate


def quantile_s(buckets: list[int], quantile: float, tick_rate: int) -> float | None:
    """The upper bound, in seconds, of the bucket where ``quantile`` of the counts is reached;
    None for an empty histogram."""
    total = sum(buckets)
    if total == 0:
        return None
    wanted = quantile * total
    seen = 0
    for b, count in enumerate(buckets):
        seen += count
        if seen >= wanted:
            return bucket_upper_bound_s(b, tick_rate)
    return bucket_upper_bound_s(len(buckets) - 1, tick_rate)
