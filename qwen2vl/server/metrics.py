"""Server metrics in the Prometheus text format (`GET /metrics`), without a client library.

Counters and histograms are updated on the event loop only (one thread), so they need no lock.
Engine-side gauges (queue, running, KV usage, cache hits) are read from `stats()` at scrape time.
"""

import bisect
from collections import defaultdict

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above every bucket
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.requests = defaultdict(int)  # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.in_flight = 0  # admitted chat requests: preprocessing, waiting or running
        self.rejected = 0  # refused because the queue was full
        self.aborted = 0  # client went away before the end
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self, stats=None, replicas=None) -> str:
        """The exposition text; `stats` is the engine's EngineStats (or None before it exists), summed over
        the replicas when there are several; `replicas`: their ReplicaHealth (qwen2vl/replicas/pool.py)."""
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples])

        metric("qwen2vl_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f'qwen2vl_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())])
        metric("qwen2vl_prompt_tokens_total", "counter", "Prompt tokens processed (visual tokens included).",
               [f"qwen2vl_prompt_tokens_total {self.prompt_tokens}"])
        metric("qwen2vl_generation_tokens_total", "counter", "Tokens generated.",
               [f"qwen2vl_generation_tokens_total {self.generation_tokens}"])
        metric("qwen2vl_requests_in_flight", "gauge", "Chat requests admitted and not finished.",
               [f"qwen2vl_requests_in_flight {self.in_flight}"])
        metric("qwen2vl_requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.",
               [f"qwen2vl_requests_rejected_total {self.rejected}"])
        metric("qwen2vl_requests_aborted_total", "counter", "Requests aborted because the client disconnected.",
               [f"qwen2vl_requests_aborted_total {self.aborted}"])
        metric("qwen2vl_time_to_first_token_seconds", "histogram", "From request arrival to the first token.",
               self.ttft.lines("qwen2vl_time_to_first_token_seconds"))
        metric("qwen2vl_request_latency_seconds", "histogram", "From request arrival to the last token.",
               self.latency.lines("qwen2vl_request_latency_seconds"))
        if stats is not None:
            metric("qwen2vl_queue_length", "gauge", "Sequences waiting in the engine for a slot.",
                   [f"qwen2vl_queue_length {stats.num_waiting}"])
            metric("qwen2vl_requests_running", "gauge", "Sequences the engine is decoding.",
                   [f"qwen2vl_requests_running {stats.num_running}"])
            metric("qwen2vl_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.",
                   [f"qwen2vl_kv_cache_usage_ratio {stats.kv_cache_usage:.6f}"])
            metric("qwen2vl_kv_cache_blocks", "gauge", "KV cache blocks in total.",
                   [f"qwen2vl_kv_cache_blocks {stats.num_blocks}"])
            metric("qwen2vl_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   [f"qwen2vl_prefix_cache_queries_total {stats.prefix_cache_queries}"])
            metric("qwen2vl_prefix_cache_hits_total", "counter", "Prompt tokens served by the prefix cache.",
                   [f"qwen2vl_prefix_cache_hits_total {stats.prefix_cache_hits}"])
            metric("qwen2vl_vision_cache_hits_total", "counter", "Images/videos whose encoding was cached.",
                   [f"qwen2vl_vision_cache_hits_total {stats.vision_cache_hits}"])
            metric("qwen2vl_preemptions_total", "counter", "Sequences preempted because the cache was full.",
                   [f"qwen2vl_preemptions_total {stats.num_preemptions}"])
        if replicas is not None:
            metric("qwen2vl_replicas", "gauge", "Engine replicas deployed.", [f"qwen2vl_replicas {replicas.total}"])
            metric("qwen2vl_replicas_up", "gauge", "Engine replicas answering.", [f"qwen2vl_replicas_up {replicas.up}"])
            metric("qwen2vl_replica_retries_total", "counter", "Requests re-run on another replica after one was lost.",
                   [f"qwen2vl_replica_retries_total {replicas.retries}"])
        return "\n".join(lines) + "\n"
