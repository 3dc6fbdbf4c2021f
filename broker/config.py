"""Loading the policy configuration from TOML (the I/O half of ``policies.config``)."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from policies.config import ConfigError, PolicyConfig, config_from_dict


def default_config_text() -> str:
    """The built-in default configuration, as TOML text."""
    return resources.files("broker").joinpath("default.toml").read_text(encoding="utf-8")


def load_config(path: Path | None = None) -> PolicyConfig:
    """Load and validate a policy TOML file, or the built-in default when ``path`` is None.

    Raises :class:`ConfigError` whose message starts with the file name.
    """
    name = str(path) if path else "built-in default.toml"
    try:
        text = path.read_text(encoding="utf-8") if path else default_config_text()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read ({exc.strerror})") from None
    try:
        return config_from_dict(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


MINILM_POOL = """
# Embeddings on the in-process all-MiniLM-L6-v2 model (the `model` extra) instead of the
# simulated GPU. One forward pass serves up to max_batch texts of concurrent jobs.
[pools.embed]
models = ["minilm-l6"]
kinds = ["embedding"]
backend = "minilm"
concurrency = 32
max_batch = 32
max_wait_ms = 2.0
cost_per_hour = 0.5
"""


def with_minilm_pool(text: str) -> str:
    """``text`` (a policy TOML) with its embeddings moved to an in-process ``minilm`` pool."""
    gpu = 'models = ["llama-3.1-8b", "llama-3.3-70b", "minilm-l6"]'
    if gpu not in text:
        raise ValueError("the config has no GPU pool serving minilm-l6 to take the embeddings from")
    return text.replace(gpu, 'models = ["llama-3.1-8b", "llama-3.3-70b"]', 1) + MINILM_POOL
