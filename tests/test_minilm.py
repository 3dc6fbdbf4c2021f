"""The in-process MiniLM backend with the real model: embeddings, dynamic batching, refusals.

These need the ``model`` extra (torch, tokenizers, safetensors and the package that ships
the weights). Without it they skip, as on a fresh machine running the README's test command;
with ``IB_REQUIRE_MODEL`` set (``.ci/run`` sets it for its second pass, after installing the
extra) they fail instead: a CI run that silently skipped the only real-model tests would
prove nothing about them.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest

from broker.client import Client
from broker.wire import Job
from tests.conftest import Roles
from workers import minilm
from workers.backend import BackendError
from workers.minilm import INSTALL_HINT, MiniLMBackend


@pytest.fixture(scope="module")
def model() -> None:
    if missing := minilm.missing_modules():
        message = f"the model extra is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
        if os.environ.get("IB_REQUIRE_MODEL"):
            pytest.fail(f"IB_REQUIRE_MODEL is set but {message}")
        pytest.skip(message)


def embedding(texts: list[str], job_id: str = "e") -> Job:
    return Job(id=job_id, model="minilm-l6", kind="embedding", texts=texts)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # the vectors have unit length


RELATED = ["A man is eating food.", "A man is eating a piece of bread."]
UNRELATED = "The stock market fell sharply on Tuesday."


@pytest.mark.usefixtures("model")
async def test_related_sentences_are_closer_than_unrelated_ones() -> None:
    backend = MiniLMBackend(device="cpu")
    try:
        out = await backend.run(embedding([*RELATED, UNRELATED]))
    finally:
        await backend.aclose()
    assert out.embeddings is not None and len(out.embeddings) == 3
    a, b, c = out.embeddings
    assert all(len(v) == 384 and math.isclose(math.hypot(*v), 1.0, abs_tol=1e-5) for v in out.embeddings)
    assert cosine(a, b) > 0.6 and cosine(a, c) < 0.2 and cosine(b, c) < 0.2, (cosine(a, b), cosine(a, c))
    assert out.completion_tokens == 0 and out.first_token_at == out.finished_at
    assert out.prompt_tokens == 8 + 11 + 10  # the tokenizer's counts, [CLS] and [SEP] included
    assert backend.passes == 1 and backend.device == "cpu"


@pytest.mark.usefixtures("model")
async def test_vectors_match_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    # sentence-transformers comes with the model package (its loader): the reference for
    # our plain-torch forward pass, pooling, normalisation and truncation at 256 tokens.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    from workers.bert import model_dir

    texts = [*RELATED, UNRELATED, "", "word " * 400, "Héllo wörld! 東京"]
    backend = MiniLMBackend(device="cpu")
    try:
        out = await backend.run(embedding(texts))
    finally:
        await backend.aclose()
    reference = st.SentenceTransformer(str(model_dir()), device="cpu").encode(texts).tolist()
    assert out.embeddings is not None
    worst = max(abs(x - y) for v, r in zip(out.embeddings, reference, strict=True) for x, y in zip(v, r, strict=True))
    assert worst < 1e-5


@pytest.mark.usefixtures("model")
async def test_concurrent_jobs_share_forward_passes_and_each_gets_its_own_vectors() -> None:
    jobs = [embedding([f"sentence {i} about topic {i % 3}", f"another line, number {i}"][: 1 + i % 2], f"j{i}")
            for i in range(24)]
    single = MiniLMBackend(device="cpu", max_batch=1)
    batched = MiniLMBackend(device="cpu", max_batch=32, max_wait_ms=20)
    try:
        # One job at a time, one text per pass: the reference vectors.
        alone = [await single.run(job) for job in jobs]
        together = await asyncio.gather(*(batched.run(job) for job in jobs))
    finally:
        await single.aclose()
        await batched.aclose()
    texts = sum(len(job.texts or []) for job in jobs)
    assert single.passes == texts
    assert batched.passes <= math.ceil(texts / 32) + 1 < len(jobs), batched.passes
    for job, ref, out in zip(jobs, alone, together, strict=True):
        assert out.embeddings is not None and ref.embeddings is not None
        assert len(out.embeddings) == len(job.texts or [])
        assert out.prompt_tokens == ref.prompt_tokens
        # Same vectors whatever else shared the pass: padding is masked out.
        for v, r in zip(out.embeddings, ref.embeddings, strict=True):
            assert max(abs(x - y) for x, y in zip(v, r, strict=True)) < 1e-5


@pytest.mark.usefixtures("model")
async def test_a_job_with_more_texts_than_max_batch_spans_several_passes_in_order() -> None:
    texts = [f"text number {i}" for i in range(10)]
    backend = MiniLMBackend(device="cpu", max_batch=4)
    try:
        out = await backend.run(embedding(texts))
        one = await backend.run(embedding([texts[7]]))
    finally:
        await backend.aclose()
    assert backend.passes == 3 + 1
    assert out.embeddings is not None and one.embeddings is not None
    assert max(abs(x - y) for x, y in zip(out.embeddings[7], one.embeddings[0], strict=True)) < 1e-5


@pytest.mark.usefixtures("model")
@pytest.mark.parametrize("job", [
    Job(id="c", model="minilm-l6", kind="chat", messages=[]),
    Job(id="p", model="minilm-l6", kind="completion", prompt="hi"),
], ids=["chat", "completion"])
async def test_other_kinds_are_refused_for_good_without_loading_the_model(job: Job) -> None:
    backend = MiniLMBackend()
    try:
        with pytest.raises(BackendError, match=f"embedding jobs only, not {job.kind} jobs") as caught:
            await backend.run(job)
    finally:
        await backend.aclose()
    assert not caught.value.retryable
    assert backend.passes == 0 and backend.device is None  # nothing loaded


def test_without_the_extra_the_backend_is_not_built_and_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the missing module: the test must hold whether or not the real extra is installed.
    monkeypatch.setattr(minilm, "REQUIRED", ("json", "no_such_module_for_the_test"))
    with pytest.raises(ModuleNotFoundError, match=r"needs no_such_module_for_the_test: pip install") as caught:
        MiniLMBackend()
    assert caught.value.name == "no_such_module_for_the_test"


# --------------------------------------------------------------------------- through the broker

E2E_CONFIG = """
[classes.standard]
ttft_ms = 10000

[pools.gpu]
models = ["llama-3.1-8b"]
kinds = ["chat", "completion"]

[pools.embed]
models = ["minilm-l6"]  # the name the device profiles know it by
kinds = ["embedding"]
backend = "minilm"
concurrency = 32
max_batch = 32
max_wait_ms = 20
"""


@pytest.mark.usefixtures("model")
async def test_embedding_jobs_through_the_broker_to_a_minilm_pool(roles: Roles, redis_url: str, prefix: str,
                                                                  tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(E2E_CONFIG)
    env = {"IB_CONFIG": str(config), "IB_BLOCK_MS": "200"}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "embed", "--grace", "5", env=env)
    jobs = [embedding([*RELATED, UNRELATED], f"e2e-{i}") for i in range(12)]
    async with Client(redis_url, prefix=prefix, block_ms=200) as sdk:
        await sdk.submit_many(jobs)
        results = await asyncio.wait_for(asyncio.gather(*(sdk.result(j.id, timeout=60) for j in jobs)), 65)
    for r in results:
        assert r.status == "ok", r
        assert r.pool == "embed" and r.kind == "embedding" and r.model == "minilm-l6"
        assert r.embeddings is not None and [len(v) for v in r.embeddings] == [384, 384, 384]
        a, b, c = r.embeddings
        assert cosine(a, b) > 0.6 > 0.2 > max(cosine(a, c), cosine(b, c))
        assert r.usage.prompt_tokens == 8 + 11 + 10 and r.usage.completion_tokens == 0
        assert r.timing is not None and r.timing.started_at <= r.timing.first_token_at == r.timing.finished_at
    assert results[0].embeddings == results[-1].embeddings  # same texts, same vectors, wherever they ran
    # Jobs that shared a forward pass finished at the same instant: fewer instants than jobs.
    assert len({r.timing.finished_at for r in results if r.timing}) < len(jobs)
    assert roles.stop_all() == [0, 0]
