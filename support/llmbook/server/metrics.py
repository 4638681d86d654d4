# Generated from notebooks/11_serving.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""What the server exposes at /metrics, in Prometheus' text format: the gauges and
counters a vLLM dashboard reads (vllm:num_requests_running and so on), here named
llmbook_. Written in notebooks/11_serving.ipynb."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The loop's state after each iteration, and counts since the server started.
    One registry per server, so that several servers in one process (the tests) keep
    their numbers apart."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("llmbook_requests_running",
                             "Requests in the batch (prefilling or decoding)",
                             registry=r)
        self.waiting = Gauge("llmbook_requests_waiting",
                             "Requests waiting for a place in the batch", registry=r)
        self.free_pages = Gauge("llmbook_kv_free_pages",
                                "Pages of the KV cache no sequence holds", registry=r)
        self.prefix_entries = Gauge("llmbook_prefix_cache_entries",
                                    "Prompt prefixes kept in the KV cache", registry=r)
        self.prompt_tokens = Counter("llmbook_prompt_tokens",
                                     "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("llmbook_prefix_cache_hit_tokens",
                                     "Prompt tokens forked from the prefix cache",
                                     registry=r)
        self.generated = Counter("llmbook_generation_tokens",
                                 "Tokens generated", registry=r)
        self.requests = Counter("llmbook_requests", "Requests answered, by status",
                                ["status"], registry=r)
        self.ttft = Histogram(
            "llmbook_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r)

    def first_token(self, seconds: float):
        self.ttft.observe(seconds)

    def update(self, loop):
        self.running.set(len(loop.prefilling) + len(loop.decoding))
        self.waiting.set(len(loop.waiting))
        self.free_pages.set(loop.runner.free_pages())
        self.prefix_entries.set(len(loop.prefix.entries) if loop.prefix else 0)
