"""Seeded workload generators with the shapes of published LLM inference traces.

Token counts are lognormal, fitted to published percentiles (``mu = ln p50``,
``sigma = ln(pX / p50) / z_X``), and clamped to ``[lo, hi]``:

* **Azure LLM inference 2023, conversation** (Splitwise, ISCA'24): input p50 1,020 and
  p90 2,700 -> mu 6.928, sigma 0.760; output p50 130 and p90 420 -> mu 4.868, sigma 0.915.
  Arrivals near-Poisson.
* **Azure LLM inference 2023, code**: input p50 1,470 and p99 7,436 -> mu 7.293, sigma
  0.697 (p90 about 3,600, mean about 1,870; the released CSV's mean is 2,048); output p50
  13 and p99 249 -> mu 2.565, sigma 1.269 (mean about 29; the CSV's is 28). Arrivals
  bursty: a two-phase hyperexponential renewal process with inter-arrival CV 10.
* **Diurnal swing**: the rate follows ``rate * (1 - A cos(2 pi t / period))``, one compressed
  "day" per run by default, with A = 0.565 (peak/trough 3.6x, the hourly swing of Azure's
  2024 conversation trace).
* **Retrieval-augmented chat** (our own design, no public trace): long prompts of retrieved
  context, input p50 3,000 and p90 9,000 (clamped at 16,000), short answers, output p50 150
  and p90 500; arrivals bursty (CV 4), as agents and batch indexers send in bursts.
* **Ramp**: the rate climbs linearly from ``start`` to ``end`` times the base rate over the
  run (0.25x to 1.75x by default): a load that passes capacity part-way and keeps rising.

Class mixes (hints) make the named workloads of :data:`WORKLOADS`. Nothing here reads a
clock or global state: randomness comes from a :class:`SeededRandom` (or any object with
the same methods, ``random.Random`` included) passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist
from typing import NamedTuple, Protocol, TypeVar

import msgspec

from policies.route import JobFeatures

Z90 = NormalDist().inv_cdf(0.90)
Z99 = NormalDist().inv_cdf(0.99)
_M64 = (1 << 64) - 1


class Draws(Protocol):
    """The random draws workloads need; :class:`SeededRandom` and ``random.Random`` have them."""

    def random(self) -> float: ...

    def expovariate(self, lambd: float) -> float: ...

    def lognormvariate(self, mu: float, sigma: float) -> float: ...


def _splitmix64(x: int) -> tuple[int, int]:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return x, z ^ (z >> 31)


class SeededRandom:
    """A seeded xoshiro256** generator: the simulator's only source of randomness.

    Its own, rather than ``random.Random``, so that ``policies`` never imports the ``random``
    module (whose module-level functions are global state). Streams of the same seed are
    independent: ``SeededRandom(seed, stream=1)`` for the router, 0 for the workload.
    """

    __slots__ = ("_s",)

    def __init__(self, seed: int, stream: int = 0) -> None:
        x = (seed ^ (stream * 0xD1B54A32D192ED03)) & _M64
        state = []
        for _ in range(4):
            x, z = _splitmix64(x)
            state.append(z)
        self._s = state

    def next64(self) -> int:
        s0, s1, s2, s3 = self._s
        x = (s1 * 5) & _M64
        result = ((((x << 7) | (x >> 57)) & _M64) * 9) & _M64
        t = (s1 << 17) & _M64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = ((s3 << 45) | (s3 >> 19)) & _M64
        self._s = [s0, s1, s2, s3]
        return result

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        return (self.next64() >> 11) * (1.0 / 9007199254740992.0)

    def expovariate(self, lambd: float) -> float:
        return -math.log(1.0 - self.random()) / lambd

    def gauss(self, mu: float, sigma: float) -> float:
        # Box-Muller, one value per call: simple, and the state stays four integers.
        u = 1.0 - self.random()
        return mu + sigma * math.sqrt(-2.0 * math.log(u)) * math.cos(2.0 * math.pi * self.random())

    def lognormvariate(self, mu: float, sigma: float) -> float:
        return math.exp(self.gauss(mu, sigma))


class Arrival(NamedTuple):
    """One job of a workload: when it arrives (s from the start), what it is, its class hint."""

    at: float
    job: JobFeatures
    hint: str | None

    @property
    def features(self) -> JobFeatures:
        """The job as it is submitted: its class hint, if any, in ``slo_hint``."""
        if self.hint is None or self.job.slo_hint == self.hint:
            return self.job
        return msgspec.structs.replace(self.job, slo_hint=self.hint)


class LogNormal(msgspec.Struct, frozen=True, kw_only=True):
    """A token-count distribution: ``round(exp(N(mu, sigma)))`` clamped to ``[lo, hi]``."""

    mu: float
    sigma: float
    lo: int = 1
    hi: int = 16_384

    @classmethod
    def fit(cls, p50: float, px: float, z: float = Z90, *, lo: int = 1, hi: int = 16_384) -> LogNormal:
        """The lognormal whose median is ``p50`` and whose quantile at normal score ``z`` is ``px``."""
        return cls(mu=math.log(p50), sigma=math.log(px / p50) / z, lo=lo, hi=hi)

    def quantile(self, q: float) -> float:
        return math.exp(self.mu + self.sigma * NormalDist().inv_cdf(q))

    def sample(self, rng: Draws) -> int:
        return min(self.hi, max(self.lo, round(rng.lognormvariate(self.mu, self.sigma))))


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """Prompt and output length distributions of one trace."""

    name: str
    prompt: LogNormal
    output: LogNormal


CONVERSATION = Shape(name="azure-2023-conversation",
                     prompt=LogNormal.fit(1020, 2700), output=LogNormal.fit(130, 420, hi=4096))
CODE = Shape(name="azure-2023-code",
             prompt=LogNormal.fit(1470, 7436, Z99), output=LogNormal.fit(13, 249, Z99, hi=4096))
RETRIEVAL = Shape(name="retrieval",
                  prompt=LogNormal.fit(3000, 9000, hi=16_000), output=LogNormal.fit(150, 500, hi=4096))


# --------------------------------------------------------------------------- arrival processes


class Poisson(msgspec.Struct, frozen=True, tag="poisson"):
    """Exponential inter-arrival times (CV 1)."""

    def times(self, rate: float, duration: float, rng: Draws) -> Iterator[float]:
        t = rng.expovariate(rate)
        while t < duration:
            yield t
            t += rng.expovariate(rate)


class Bursty(msgspec.Struct, frozen=True, tag="bursty"):
    """Two-phase hyperexponential gaps with balanced means: mean ``1/rate``, CV ``cv``.

    Most gaps come from a fast phase (about twice the mean rate: a burst); a few are very
    long (about ``cv**2`` mean gaps: a lull). With ``cv`` 10 the lulls are 0.5% of gaps.
    """

    cv: float = 10.0

    def phases(self, rate: float) -> tuple[float, float, float]:
        """(probability of the fast phase, its rate, the slow phase's rate)."""
        c2 = self.cv**2
        p = 0.5 * (1 + math.sqrt((c2 - 1) / (c2 + 1)))
        return p, 2 * p * rate, 2 * (1 - p) * rate

    def gap(self, rate: float, rng: Draws) -> float:
        p, fast, slow = self.phases(rate)
        return rng.expovariate(fast if rng.random() < p else slow)

    def times(self, rate: float, duration: float, rng: Draws) -> Iterator[float]:
        t = self.gap(rate, rng)
        while t < duration:
            yield t
            t += self.gap(rate, rng)


class Diurnal(msgspec.Struct, frozen=True, tag="diurnal"):
    """Poisson arrivals at ``rate * (1 - amplitude * cos(2 pi t / period))`` (thinning).

    Starts at the trough, peaks mid-period; the mean over a whole period is ``rate``.
    ``period_s`` 0 means one period per run (the run's duration).
    """

    amplitude: float = 0.565
    period_s: float = 0.0

    def times(self, rate: float, duration: float, rng: Draws) -> Iterator[float]:
        period = self.period_s or duration
        peak = rate * (1 + self.amplitude)
        t = rng.expovariate(peak)
        while t < duration:
            if rng.random() * peak < rate * (1 - self.amplitude * math.cos(2 * math.pi * t / period)):
                yield t
            t += rng.expovariate(peak)


class Ramp(msgspec.Struct, frozen=True, tag="ramp"):
    """Poisson arrivals at a rate rising linearly from ``start`` to ``end`` times ``rate`` over
    the run (thinning); the mean over the run is ``(start + end) / 2`` times ``rate``."""

    start: float = 0.25
    end: float = 1.75

    def times(self, rate: float, duration: float, rng: Draws) -> Iterator[float]:
        peak = rate * max(self.start, self.end)
        t = rng.expovariate(peak)
        while t < duration:
            if rng.random() * peak < rate * (self.start + (self.end - self.start) * t / duration):
                yield t
            t += rng.expovariate(peak)


ArrivalProcess = Poisson | Bursty | Diurnal | Ramp
T = TypeVar("T")


# --------------------------------------------------------------------------- workloads


class Component(msgspec.Struct, frozen=True, kw_only=True):
    """A share of a workload's jobs: one trace shape, one class hint, a mix of models."""

    share: float
    shape: Shape
    hint: str | None
    kind: str = "chat"
    tenant: str = "sim"
    models: tuple[tuple[str, float], ...] = (("llama-3.1-8b", 1.0),)
    """(model, weight) pairs."""


def _pick(items: tuple[tuple[T, float], ...], rng: Draws) -> T:
    x = rng.random() * sum(w for _, w in items)
    for item, weight in items:
        x -= weight
        if x < 0:
            return item
    return items[-1][0]


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    """A named mix of components arriving by one process at ``rate`` jobs/s on average."""

    name: str
    description: str
    rate: float
    arrivals: ArrivalProcess
    components: tuple[Component, ...]

    def at_rate(self, rate: float) -> Workload:
        return msgspec.structs.replace(self, rate=rate)

    def scaled(self, factor: float) -> Workload:
        return msgspec.structs.replace(self, rate=self.rate * factor)

    def generate(self, rng: Draws, duration: float) -> Iterator[Arrival]:
        """Arrivals in ``[0, duration)``, in time order. Same rng state, same jobs."""
        weighted = tuple((c, c.share) for c in self.components)
        for t in self.arrivals.times(self.rate, duration, rng):
            c = _pick(weighted, rng)
            job = JobFeatures(tenant=c.tenant, model=_pick(c.models, rng), kind=c.kind,
                              prompt_tokens=c.shape.prompt.sample(rng), max_tokens=c.shape.output.sample(rng),
                              slo_hint=c.hint)
            yield Arrival(t, job, c.hint)


def generate(workload: Workload, seed: int, duration: float) -> list[Arrival]:
    """The whole arrival list of ``workload`` for ``seed`` (its own generator, nothing shared)."""
    return list(workload.generate(SeededRandom(seed), duration))


_MODELS = (("llama-3.1-8b", 0.8), ("llama-3.3-70b", 0.2))
_CHAT = (Component(share=0.7, shape=CONVERSATION, hint="interactive", tenant="chat", models=_MODELS),
         Component(share=0.3, shape=CONVERSATION, hint="standard", tenant="chat", models=_MODELS))
_MIXED = (Component(share=0.4, shape=CONVERSATION, hint="interactive", tenant="chat", models=_MODELS),
          Component(share=0.2, shape=CODE, hint="standard", kind="completion", tenant="ide", models=_MODELS),
          Component(share=0.4, shape=CONVERSATION, hint="batch", kind="completion", tenant="reports",
                    models=_MODELS))

WORKLOADS: dict[str, Workload] = {
    "chat": Workload(
        name="chat", rate=40.0, arrivals=Poisson(),
        description="chat-heavy: Azure 2023 conversation shape, Poisson; 70% interactive, 30% standard; "
                    "80% Llama-3.1-8B, 20% Llama-3.3-70B",
        components=_CHAT,
    ),
    "code": Workload(
        name="code", rate=150.0, arrivals=Bursty(cv=10.0),
        description="code-heavy, bursty: Azure 2023 code shape, hyperexponential arrivals (CV 10); "
                    "80% interactive, 20% standard; 80% 8B, 20% 70B",
        components=(Component(share=0.8, shape=CODE, hint="interactive", kind="completion", tenant="ide",
                              models=_MODELS),
                    Component(share=0.2, shape=CODE, hint="standard", kind="completion", tenant="ide",
                              models=_MODELS)),
    ),
    "mixed": Workload(
        name="mixed", rate=50.0, arrivals=Poisson(),
        description="mixed with a batch class: 40% interactive chat, 20% standard code completions, "
                    "40% batch (conversation shape); Poisson; 80% 8B, 20% 70B",
        components=_MIXED,
    ),
    "diurnal": Workload(
        name="diurnal", rate=40.0, arrivals=Diurnal(),
        description="the chat mix under a diurnal swing (peak/trough 3.6x, one period per run)",
        components=_CHAT,
    ),
    "rag": Workload(
        name="rag", rate=40.0, arrivals=Bursty(cv=4.0),
        description="retrieval-augmented chat, bursty (CV 4): long prompts (p50 3,000, p90 9,000 tokens), "
                    "short answers; 60% interactive, 30% standard, 10% batch; 80% 8B, 20% 70B",
        components=(Component(share=0.6, shape=RETRIEVAL, hint="interactive", tenant="rag", models=_MODELS),
                    Component(share=0.3, shape=RETRIEVAL, hint="standard", tenant="rag", models=_MODELS),
                    Component(share=0.1, shape=RETRIEVAL, hint="batch", kind="completion", tenant="index",
                              models=_MODELS)),
    ),
    "ramp": Workload(
        name="ramp", rate=50.0, arrivals=Ramp(),
        description="the mixed mix on a ramp: the rate climbs linearly from 0.25x to 1.75x the base rate "
                    "over the run, past capacity",
        components=_MIXED,
    ),
}
