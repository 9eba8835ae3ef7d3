"""Prometheus metrics of the front end (`stts_*`), served with vLLM's own (`vllm:*`) from the
same default registry on `/metrics`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)

REQUESTS = Counter("stts_requests_total", "HTTP requests by route and status", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "stts_request_duration_seconds",
    "End-to-end request latency",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "stts_time_to_first_token_seconds",
    "Request arrival to first output token",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "stts_time_per_output_token_seconds",
    "Mean time per output token after the first",
    buckets=_TOKEN_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "stts_video_decode_seconds",
    "Time to decode and sample one video (cache misses)",
    buckets=_LATENCY_BUCKETS,
)
FRAMES_DECODED = Counter(
    "stts_video_frames_decoded_total",
    "Frames FFmpeg decoded for videos, sampled or skipped, probes included: the decode work",
)
DECODES = Counter(
    "stts_video_decodes_total", "Videos prepared, by decoded-frame cache outcome", ["cache"]
)
FRAMES_SAMPLED = Counter("stts_frames_sampled_total", "Video frames sampled for the model")
VIDEO_TOKENS_BEFORE = Counter(
    "stts_video_tokens_before_pruning_total", "Video tokens the unpruned model would see"
)
VIDEO_TOKENS_AFTER = Counter(
    "stts_video_tokens_after_pruning_total", "Video tokens the LLM saw after STTS pruning"
)
TOKENS_SAVED = Counter("stts_video_tokens_saved_total", "Video tokens removed by STTS pruning")
IN_FLIGHT = Gauge("stts_requests_in_flight", "Admitted requests not yet finished")
QUEUED = Gauge("stts_requests_queued", "Admitted requests still waiting for their first token")
REJECTED = Counter("stts_requests_rejected_total", "Requests refused for overload (429)")

# Labelled series exist from start-up (zero), so dashboards and alerts never watch nothing.
for _route in ("/v1/chat/completions", "/v1/files"):
    REQUESTS.labels(route=_route, status="200")
    REQUEST_SECONDS.labels(route=_route)
for _outcome in ("hit", "miss"):
    DECODES.labels(cache=_outcome)


class EncoderCollector:
    """The pruned vision tower's counters, kept by the model in vLLM's worker process
    (`stts_model.EncoderCalls`) and fetched when `/metrics` is scraped (`EngineService.
    encoder_calls`): encoder calls per video and time per video under load. Zeros until the
    engine answers, and for stock checkpoints."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        v = self.values
        counters = (
            (
                "stts_encoder_calls",
                "Calls of the pruned vision tower (videos encoded together count once)",
                "calls",
            ),
            ("stts_encoder_videos", "Videos encoded by the pruned vision tower", "videos"),
            ("stts_encoder_patches", "Unpruned patches the pruned vision tower took", "patches"),
            (
                "stts_encoder_seconds",
                "Time in the pruned vision tower (on GPUs only with STTS_ENCODER_TIMING=1)",
                "seconds",
            ),
        )
        for name, documentation, key in counters:
            yield CounterMetricFamily(name, documentation, value=float(v.get(key, 0.0)))
        yield GaugeMetricFamily(
            "stts_encoder_largest_call_patches",
            "Most unpruned patches one pruned-tower call took (bounded by the patch budget)",
            value=float(v.get("largest_patches", 0.0)),
        )


ENCODER = EncoderCollector()
REGISTRY.register(ENCODER)
