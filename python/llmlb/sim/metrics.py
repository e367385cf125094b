"""The simulator's ``/metrics`` page, laid out exactly as vLLM's: written by prometheus_client, as
vLLM's is (counters with ``_total``, then a ``*_created`` family; histograms: buckets, ``_count``,
``_sum``; labels sorted; Go-style numbers such as ``3.0`` and ``1.2e+07``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from llmlb.sim.engine import FINISH_REASONS, TTFT_BUCKETS, Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LORA_SERIES_LIMIT = 32
"""Label sets of vllm:lora_requests_info kept (vLLM keeps every one it ever set; we keep the newest)."""


def _gauge(name: str, help_text: str, series: Iterable[tuple[Mapping[str, str], float]]) -> Metric:
    family = Metric(name, help_text, "gauge")
    for labels, value in series:
        family.add_sample(name, dict(labels), value)
    return family


def _counter(
    name: str, help_text: str, series: Iterable[tuple[Mapping[str, str], float]], created: float
) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=())
    for labels, value in series:
        family.add_sample(f"{family.name}_total", dict(labels), value)
        family.add_sample(f"{family.name}_created", dict(labels), created)
    return family


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


class _Page:
    """The engine's families as a prometheus_client collector, read when the page is asked for."""

    def __init__(self, engine: Engine, lora: LoraInfo | None, created: float) -> None:
        self.engine = engine
        self.lora = lora
        self.created = created

    def collect(self) -> Iterator[Metric]:
        engine, created = self.engine, self.created
        cfg = engine.config
        stats = engine.stats
        labels = {"engine": "0", "model_name": cfg.model}
        yield _gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            [(labels, float(len(engine.running)))],
        )
        yield _gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            [(labels, float(len(engine.waiting)))],
        )
        yield _gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            [(labels, engine.cache.usage)],
        )
        yield _counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            [(labels, float(stats.prefix_queries))],
            created,
        )
        yield _counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            [(labels, float(stats.prefix_hits))],
            created,
        )
        yield _counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            [(labels, float(stats.prompt_tokens))],
            created,
        )
        yield _counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            [(labels, float(stats.generation_tokens))],
            created,
        )
        yield _counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [({**labels, "finished_reason": r}, float(stats.finished.get(r, 0))) for r in FINISH_REASONS],
            created,
        )
        ttft = HistogramMetricFamily(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels=list(labels),
        )
        cumulative = 0.0
        buckets = []
        for bound, count in zip((*TTFT_BUCKETS, math.inf), stats.ttft_buckets, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        ttft.add_metric(list(labels.values()), buckets, stats.ttft_sum)
        ttft.samples.append(Sample(f"{ttft.name}_created", labels, created))
        yield ttft
        cache_config = {
            "block_size": str(cfg.block_size),
            "enable_prefix_caching": "True",
            "num_gpu_blocks": str(cfg.kv_blocks),
        }
        yield _gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", [(cache_config, 1.0)]
        )
        if self.lora is not None:
            yield _gauge("vllm:lora_requests_info", "Running stats on lora requests.", self.lora.series())


def render(engine: Engine, lora: LoraInfo | None, created: float) -> str:
    """The page for `engine` now. `created` (unix time of the start or last reset) stamps ``*_created``
    families; `lora` is given when adapters are loaded."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Page(engine, lora, created))
    return generate_latest(registry).decode()
