"""The one configuration schema of fla_ds.

Precedence, lowest first: the dataclass defaults below (documented field by field), a YAML
file shipped in ``fla_ds/configs/`` or given by path, then ``key=value`` overrides from the
command line. Each pipeline step reads its own section; every output folder receives the
fully resolved config that produced it (``save_resolved``).

Configs are untrusted input: they are parsed as plain YAML by omegaconf, never evaluated, and
a key that the schema does not know, or a value of the wrong type, is refused with a one-line
error naming the key (and the closest valid key).
"""
from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fla_ds.schema import (  # noqa: F401  (re-exported: the schema is imported from here)
    AugmentConfig,
    BenchConfig,
    Config,
    CorpusConfig,
    Decode,
    DemoConfig,
    EvalConfig,
    Level,
    LightTConfig,
    Optimizer,
    Precision,
    ShardsConfig,
    Stage2Config,
    StreamConfig,
    SynthConfig,
    TrainConfig,
    VisualConfig,
)

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config or override that does not fit the schema; the message is one line."""


@functools.cache
def all_keys() -> tuple[str, ...]:
    """Every dotted key of the schema (sections and leaves), for checking overrides and the
    did-you-mean hint. Made once per process: building the structured schema costs ~0.1 s, and
    every override was paying it (seconds per launch of a rank)."""
    return tuple(keys_under(OmegaConf.structured(Config)))


def keys_under(node: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys of a config node, depth first."""
    keys = []
    for name in node:
        path = f"{prefix}{name}"
        keys.append(path)
        child = node[name]
        if isinstance(child, DictConfig):
            keys.extend(keys_under(child, path + "."))
    return keys


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _one_line(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        return ConfigError(f"{where}unknown config key '{key}'{_closest(str(key))}")
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{where}bad value for config key '{key}': {msg}")


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config by name ('demo' -> fla_ds/configs/demo.yaml) or a file path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped config ({choices})")


def explicit_keys(config_file: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> set[str]:
    """The dotted keys a user set: every leaf of the config file and every override's key (a
    whole section given at once, ``augment={...}``, counts for all keys under it: see
    ``is_explicit``). What stage 2 checks against what it inherits from stage 1."""
    def leaves(node: Any, prefix: str = "") -> set[str]:
        if not isinstance(node, dict):
            return {prefix.rstrip(".")}
        return set().union(*(leaves(value, f"{prefix}{name}.") for name, value in node.items()))

    from_file = leaves(OmegaConf.to_container(OmegaConf.load(resolve_config_path(config_file)))) if config_file else set()
    return (from_file - {""}) | {parse_override(text)[0] for text in overrides}


def is_explicit(key: str, explicit: set[str]) -> bool:
    """``key`` or a section above it is in ``explicit`` (``explicit_keys``)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def refuse_contradictions(section: str, ours, theirs, explicit: set[str], source: str) -> None:
    """Raise ConfigError when a key of ``section`` the user set (``explicit``) differs from the
    value the model was trained with (``theirs``, read from ``source``): settings a model
    carries are inherited, never silently replaced."""
    for key, value in theirs.items():
        if is_explicit(f"{section}.{key}", explicit) and ours[key] != value:
            raise ConfigError(f"{section}.{key}={ours[key]} contradicts {section}.{key}={value} that the model was trained with "
                              f"({source}); drop it: the model's own value is used")


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value


def load_config(config_file: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Schema defaults <- YAML file <- key=value overrides, validated against the schema."""
    cfg = OmegaConf.structured(Config)
    if config_file:
        path = resolve_config_path(config_file)
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml errors span lines; keep the first
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            raise _one_line(exc, f"{path}: ") from None
    for text in overrides:
        key, value = parse_override(text)
        if key not in all_keys():
            raise ConfigError(f"unknown config key '{key}'{_closest(key)}")
        try:
            if value.strip() == "" and isinstance(OmegaConf.select(cfg, key), str):
                value = "''"  # `visual.pretrained=` clears a text key (YAML would read it as null)
            # from_dotlist parses the value with omegaconf's safe YAML loader: python tags refused.
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as exc:
            raise _one_line(exc, "") from None
        except Exception as exc:  # yaml errors
            raise ConfigError(f"bad value for config key '{key}': {str(exc).splitlines()[0]}") from None
    check_names(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg  # a DictConfig typed by the schema; attribute access as on Config


TOOLING_SECTIONS = ("demo", "bench", "synth")
"""Sections of the tools around training, left out of run folders and checkpoints."""


def registered_names() -> dict[str, tuple[str, ...]]:
    """Keys whose values name a registered component, and the names each accepts (each
    registry is the one place a new corpus, backend or logger is added)."""
    from fla_ds.backends import BACKENDS
    from fla_ds.corpus import READERS
    from fla_ds.evaluate.metrics import SCORES
    from fla_ds.loggers import LOGGERS

    return {"corpus.name": tuple(READERS), "stage2.backend": tuple(BACKENDS), "train.loggers": tuple(LOGGERS),
            "train.best_metric": SCORES}


def check_names(cfg) -> None:
    """Refuse a value that names no registered component, at parse time, in one line."""
    for key, valid in registered_names().items():
        value = OmegaConf.select(cfg, key)
        for name in (value if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]):
            if str(name).strip().lower() not in valid:
                match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
                hint = f" (did you mean '{match[0]}'?)" if match else ""
                raise ConfigError(f"bad value for config key '{key}': '{name}' is not one of {', '.join(valid)}{hint}")


def to_yaml(cfg: Config, tooling: bool = False) -> str:
    """The resolved config as YAML; without the tooling sections unless ``tooling``."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if not tooling:
        for section in TOOLING_SECTIONS:
            data.pop(section, None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def to_container(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def save_resolved(cfg: Config, folder: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config into an output folder atomically."""
    from fla_ds.atomic import atomic_write_text

    path = Path(folder) / name
    atomic_write_text(path, to_yaml(cfg))
    return path
