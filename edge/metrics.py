"""Counters and gauges of the HTTP endpoint, rendered in Prometheus' text format."""
from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.errors = 0  # requests answered with a 4xx/5xx status
        self.ttft_sum = 0.0  # seconds from request to first token, summed
        self.ttft_count = 0
        self.decode_rate = 0.0  # tokens/s of the last request's decode phase
        self.queue_depth = 0  # requests waiting for the engine
        self.busy = 0  # requests generating now (0 or 1: one at a time)
        self.cached_tokens = 0  # prompt tokens served by the prefix cache instead of prefilled
        self.prefix_cache_bytes = 0  # memory the prefix cache's snapshots hold now
        self.prefix_cache_entries = 0
        self.drafted_tokens = 0  # tokens speculative decoding drafted and verified
        self.accepted_tokens = 0  # of which accepted

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.errors += status >= 400

    def generation(self, prompt_tokens: int, generated: int, ttft: float | None, decode_rate: float | None,
                   cached_tokens: int = 0, drafted: int = 0, accepted: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.drafted_tokens += drafted
            self.accepted_tokens += accepted
            self.generated_tokens += generated
            if ttft is not None:
                self.ttft_sum += ttft
                self.ttft_count += 1
            if decode_rate is not None:
                self.decode_rate = decode_rate

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE edge_requests_total counter"]
            lines += [f'edge_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += [
                "# TYPE edge_errors_total counter", f"edge_errors_total {self.errors}",
                "# TYPE edge_prompt_tokens_total counter", f"edge_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE edge_prompt_tokens_cached_total counter", f"edge_prompt_tokens_cached_total {self.cached_tokens}",
                "# TYPE edge_prefix_cache_bytes gauge", f"edge_prefix_cache_bytes {self.prefix_cache_bytes}",
                "# TYPE edge_prefix_cache_entries gauge", f"edge_prefix_cache_entries {self.prefix_cache_entries}",
                "# TYPE edge_generated_tokens_total counter", f"edge_generated_tokens_total {self.generated_tokens}",
                "# TYPE edge_draft_tokens_total counter", f"edge_draft_tokens_total {self.drafted_tokens}",
                "# TYPE edge_draft_tokens_accepted_total counter",
                f"edge_draft_tokens_accepted_total {self.accepted_tokens}",
                "# TYPE edge_draft_acceptance_ratio gauge",
                f"edge_draft_acceptance_ratio {self.accepted_tokens / max(self.drafted_tokens, 1):.4f}",
                "# TYPE edge_time_to_first_token_seconds summary",
                f"edge_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"edge_time_to_first_token_seconds_count {self.ttft_count}",
                "# TYPE edge_decode_tokens_per_second gauge", f"edge_decode_tokens_per_second {self.decode_rate:.3f}",
                "# TYPE edge_queue_depth gauge", f"edge_queue_depth {self.queue_depth}",
                "# TYPE edge_busy gauge", f"edge_busy {self.busy}",
            ]
        return "\n".join(lines) + "\n"
