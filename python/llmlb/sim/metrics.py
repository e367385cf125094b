"""The simulator's ``/metrics`` page, laid out exactly as vLLM's (prometheus_client, one process).

prometheus_client writes, per family: ``# HELP`` and ``# TYPE`` naming the sample (counters with their
``_total``), the samples with labels sorted by name and Go-style numbers (``3.0``, ``1.2e+07``), then
for counters and histograms a ``*_created`` gauge family. Histograms: buckets, ``_count``, ``_sum``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from llmlb.sim.engine import FINISH_REASONS, TTFT_BUCKETS, Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LORA_SERIES_LIMIT = 32
"""Label sets of vllm:lora_requests_info kept (vLLM keeps every one it ever set; we keep the newest)."""


def go_float(value: float) -> str:
    """A number as prometheus_client writes it: ``0.0``, ``12.5``, ``1.5e+09``, ``+Inf``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    whole, dot, frac = text.partition(".")
    # Go (and so prometheus_client) switches to an exponent once the integer part passes six digits.
    if value > 0 and dot and "e" not in text and len(whole) > 6:
        mantissa = f"{whole[0]}.{whole[1:]}{frac}".rstrip("0").rstrip(".")
        return f"{mantissa}e+{len(whole) - 1:02d}"
    return text


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Page:
    def __init__(self, created: float) -> None:
        self.lines: list[str] = []
        self.created = created

    def head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        self.lines.append(f"{name}{{{inner}}} {go_float(value)}")

    def gauge(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[Mapping[str, str], float]],
        kind: str = "gauge",
    ) -> None:
        self.head(name, kind, help_text)
        for labels, value in series:
            self.sample(name, labels, value)

    def counter(self, name: str, help_text: str, series: list[tuple[Mapping[str, str], float]]) -> None:
        """`name` ends in ``_total``; so do its HELP and TYPE lines (prometheus_client's text format)."""
        self.gauge(name, help_text, series, kind="counter")
        self.created_family(name.removesuffix("_total"), help_text, [labels for labels, _ in series])

    def created_family(self, base: str, help_text: str, series: list[Mapping[str, str]]) -> None:
        self.gauge(f"{base}_created", help_text, [(labels, self.created) for labels in series])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class LoraInfo:
    """vllm:lora_requests_info: vLLM stamps the current label set with the time and never drops the
    older ones, so the page holds every adapter combination seen, the newest being the state."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._series: dict[tuple[str, str], float] = {}

    def update(self, running: Iterable[str], waiting: Iterable[str], now: float) -> None:
        key = (",".join(sorted(running)), ",".join(sorted(waiting)))
        self._series.pop(key, None)
        self._series[key] = now
        while len(self._series) > LORA_SERIES_LIMIT:
            del self._series[next(iter(self._series))]

    def reset(self) -> None:
        self._series.clear()

    def series(self) -> list[tuple[dict[str, str], float]]:
        return [
            (
                {
                    "max_lora": str(self.max_loras),
                    "running_lora_adapters": run,
                    "waiting_lora_adapters": wait,
                },
                stamp,
            )
            for (run, wait), stamp in self._series.items()
        ]


def render(engine: Engine, lora: LoraInfo | None, created: float) -> str:
    """The page for `engine` now. `created` (unix time of the start or last reset) stamps ``*_created``
    families; `lora` is given when adapters are loaded."""
    cfg = engine.config
    stats = engine.stats
    labels = {"engine": "0", "model_name": cfg.model}
    page = _Page(created)
    page.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [(labels, float(len(engine.running)))],
    )
    page.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [(labels, float(len(engine.waiting)))],
    )
    page.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        [(labels, engine.cache.usage)],
    )
    page.counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        [(labels, float(stats.prefix_queries))],
    )
    page.counter(
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        [(labels, float(stats.prefix_hits))],
    )
    page.counter(
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
        [(labels, float(stats.prompt_tokens))],
    )
    page.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        [(labels, float(stats.generation_tokens))],
    )
    page.counter(
        "vllm:request_success_total",
        "Count of successfully processed requests.",
        [({**labels, "finished_reason": r}, float(stats.finished.get(r, 0))) for r in FINISH_REASONS],
    )
    name = "vllm:time_to_first_token_seconds"
    help_text = "Histogram of time to first token in seconds."
    page.head(name, "histogram", help_text)
    cumulative = 0
    for bound, count in zip((*TTFT_BUCKETS, math.inf), stats.ttft_buckets, strict=True):
        cumulative += count
        page.sample(f"{name}_bucket", {**labels, "le": go_float(bound)}, float(cumulative))
    page.sample(f"{name}_count", labels, float(cumulative))
    page.sample(f"{name}_sum", labels, stats.ttft_sum)
    page.created_family(name, help_text, [labels])
    cache_config = {
        "block_size": str(cfg.block_size),
        "enable_prefix_caching": "True",
        "num_gpu_blocks": str(cfg.kv_blocks),
    }
    page.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", [(cache_config, 1.0)])
    if lora is not None:
        page.gauge("vllm:lora_requests_info", "Running stats on lora requests.", lora.series())
    return page.text()
