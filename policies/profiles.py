"""Device latency models: TTFT and inter-token latency as functions of load.

The numbers are published figures (see docs/architecture.md for sources):

* Llama-3.1-8B on one H100, NIM 1.8 FP8: TTFT 10 ms and ITL 4.6 ms at concurrency 1,
  ITL 7.6 ms at 100, ITL 16 ms and TTFT 0.6 s at 250.
* Llama-3.3-70B on 2xH100, FP8, 5000 in / 500 out: TTFT 0.41 s and ITL 18.6 ms at 1,
  ITL 60 ms at 50, saturating near 920 tok/s (about 108 ms ITL) with TTFT 8 s at 100.
* Cerebras: about 1,800 / 450 tok/s per user for 8B / 70B, TTFT about 0.24 s; a hard
  concurrency cap per system (on-chip SRAM), beyond which the service answers 429.

Between measured points the curves are interpolated linearly; past the last point they
extrapolate along the last segment. Prefill time scales with prompt length relative to
the prompt length of the benchmark the TTFT was measured at.
"""

from __future__ import annotations

import itertools

import msgspec


def interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation through ``points`` (sorted by x), extrapolating."""
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


class ModelProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Latency of one model on one device kind, by concurrency (jobs in flight)."""

    ttft_ms: tuple[tuple[float, float], ...]
    """(concurrency, TTFT in ms at ``ref_prompt_tokens``)."""
    itl_ms: tuple[tuple[float, float], ...]
    """(concurrency, inter-token latency in ms)."""
    ref_prompt_tokens: int = 1000
    min_prefill_fraction: float = 0.2
    """Short prompts still pay this share of the reference TTFT (scheduling, network)."""

    def ttft(self, prompt_tokens: int, concurrency: int) -> float:
        """Predicted time to first token in ms for a prompt at the given concurrency."""
        scale = max(self.min_prefill_fraction, prompt_tokens / self.ref_prompt_tokens)
        return interpolate(self.ttft_ms, max(1, concurrency)) * scale

    def itl(self, concurrency: int) -> float:
        """Predicted inter-token latency (time per output token) in ms."""
        return interpolate(self.itl_ms, max(1, concurrency))

    def service_ms(self, prompt_tokens: int, output_tokens: int, concurrency: int) -> float:
        """Predicted time from start to last token, in ms."""
        decode = max(0, output_tokens - 1) * self.itl(concurrency)
        return self.ttft(prompt_tokens, concurrency) + decode


class DeviceProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A kind of device: the models it runs and a hard cap on concurrent jobs."""

    name: str
    models: dict[str, ModelProfile]
    max_concurrency: int | None = None
    """Beyond this many jobs in flight the device refuses work (a 429)."""
    default: ModelProfile | None = None
    """Profile for models not listed in ``models``; ``None`` means they are not served."""

    def model(self, name: str) -> ModelProfile | None:
        """The latency model for ``name``, or ``None`` if this device cannot run it."""
        return self.models.get(name, self.default)


_H100_8B = ModelProfile(
    ttft_ms=((1, 10.0), (100, 150.0), (250, 600.0)),
    itl_ms=((1, 4.6), (100, 7.6), (250, 16.0)),
)
_H100_70B = ModelProfile(
    ttft_ms=((1, 410.0), (50, 2000.0), (100, 8000.0)),
    itl_ms=((1, 18.6), (50, 60.0), (100, 108.0)),
    ref_prompt_tokens=5000,
)
# Embeddings: no decode phase; a small encoder is prefill only.
_H100_EMBED = ModelProfile(ttft_ms=((1, 3.0), (256, 40.0)), itl_ms=((1, 0.0),), ref_prompt_tokens=512)
_ACCEL_8B = ModelProfile(
    ttft_ms=((1, 120.0), (8, 160.0)), itl_ms=((1, 1000 / 1800), (8, 1000 / 1500)),
    min_prefill_fraction=0.8,
)
_ACCEL_70B = ModelProfile(
    ttft_ms=((1, 240.0), (8, 320.0)), itl_ms=((1, 1000 / 450), (8, 1000 / 380)),
    ref_prompt_tokens=5000, min_prefill_fraction=0.8,
)

PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile(
        name="h100",
        models={"llama-3.1-8b": _H100_8B, "llama-3.3-70b": _H100_70B, "minilm-l6": _H100_EMBED},
    ),
    "accel": DeviceProfile(
        name="accel",
        models={"llama-3.1-8b": _ACCEL_8B, "llama-3.3-70b": _ACCEL_70B},
        max_concurrency=8,
    ),
    # Answers at once: for measuring the broker itself (benchmarks, plumbing tests).
    "instant": DeviceProfile(
        name="instant",
        models={},
        default=ModelProfile(ttft_ms=((1, 0.0),), itl_ms=((1, 0.0),)),
    ),
}
