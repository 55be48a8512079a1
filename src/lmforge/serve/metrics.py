"""Prometheus text-format metrics, kept in-process (no client library needed for a handful of series)."""

from __future__ import annotations

import threading
from collections import defaultdict


class Counter:
    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] += amount


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter()
        self.tokens_in = Counter()
        self.tokens_out = Counter()
        self.preemptions = Counter()
        self.draft_tokens = Counter()  # speculative decoding's guesses, by result (accepted / rejected)
        self.ttft = Histogram(_LATENCY)
        self.itl = Histogram(_LATENCY)
        self.waiting = 0
        self.running = 0

    def set_gauges(self, waiting: int, running: int) -> None:
        self.waiting, self.running = waiting, running

    def render(self) -> str:
        lines: list[str] = []

        def counter(name: str, help_: str, c: Counter) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} counter"])
            if not c.values:
                lines.append(f"{name} 0")
            for labels, v in sorted(c.values.items()):
                lab = ",".join(f'{k}="{val}"' for k, val in labels)
                lines.append(f"{name}{{{lab}}} {v:g}" if lab else f"{name} {v:g}")

        def gauge(name: str, help_: str, v: float) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {v:g}"])

        def histogram(name: str, help_: str, h: Histogram) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
            for b, c in zip(h.buckets, h.counts):
                lines.append(f'{name}_bucket{{le="{b:g}"}} {c}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
            lines.append(f"{name}_sum {h.sum:.6f}")
            lines.append(f"{name}_count {h.count}")

        counter("lmforge_requests_total", "HTTP requests by endpoint and status code.", self.requests)
        counter("lmforge_prompt_tokens_total", "Prompt tokens processed.", self.tokens_in)
        counter("lmforge_generation_tokens_total", "Tokens generated.", self.tokens_out)
        counter("lmforge_preemptions_total", "Sequences preempted to keep the KV cache within its memory budget "
                "(resumed later by recomputing their keys and values).", self.preemptions)
        counter("lmforge_draft_tokens_total", "Tokens guessed by speculative decoding, by whether the model "
                "agreed (accepted) or not (rejected).", self.draft_tokens)
        gauge("lmforge_queue_depth", "Sequences waiting for a slot.", self.waiting)
        gauge("lmforge_running_sequences", "Sequences being decoded.", self.running)
        histogram("lmforge_time_to_first_token_seconds", "Time from request to first generated token.", self.ttft)
        histogram("lmforge_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.", self.itl)
        return "\n".join(lines) + "\n"
