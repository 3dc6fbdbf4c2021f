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
