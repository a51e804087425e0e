"""Settings every run reads: ``<data root>/settings.yaml``.

Runs launched by automation (and most from the UI) carry no run config, so without a shared
place every automated run would use the SPEC defaults. The settings file has the run-config
layout (the same as ``gtex-assets demo --config``)::

    ops:
      tissue_classifier:
        config: {backbone: efficientnet_lite0, weights: package, epochs: 3}

and each asset's effective config is, field by field: what the run's config set explicitly >
the settings file > the Config class's defaults (the SPEC's). The file is read when the step
starts, so an edit applies to the next run without reloading the code location.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gtex_assets.core.atomic import atomic_open

SETTINGS_FILE = "settings.yaml"

C = TypeVar("C", bound=BaseModel)


class SettingsError(ValueError):
    """The settings file is unreadable or does not fit an asset's config; names file and op."""


def settings_path(root: str | Path) -> Path:
    return Path(root) / SETTINGS_FILE


def load_settings(root: str | Path) -> dict[str, Any]:
    """The parsed settings file (``{}`` when there is none)."""
    path = settings_path(root)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SettingsError(f"{path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:  # carries line and column
        raise SettingsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ops", {}), dict):
        raise SettingsError(f"{path}: must be a mapping with an 'ops:' section")
    return data


def op_settings(root: str | Path, op_name: str) -> dict[str, Any]:
    """``ops.<op_name>.config`` of the settings file ({} when absent)."""
    entry = (load_settings(root).get("ops") or {}).get(op_name) or {}
    cfg = entry.get("config", {}) if isinstance(entry, dict) else None
    if not isinstance(cfg, dict):
        raise SettingsError(f"{settings_path(root)}: ops.{op_name}.config must be a mapping")
    return cfg


def effective_config(config: C, overrides: Mapping[str, Any], *, origin: str = "settings") -> C:
    """``config`` with ``overrides`` applied to every field the run did not set explicitly
    (pydantic's ``model_fields_set``). Unknown or invalid fields raise, naming ``origin``."""
    fields = type(config).model_fields
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise SettingsError(f"{origin}: unknown field(s) {unknown}; known: {sorted(fields)}")
    explicit = {k: getattr(config, k) for k in config.model_fields_set}
    if not overrides:
        return config
    try:
        return type(config)(**{**overrides, **explicit})
    except ValidationError as e:
        raise SettingsError(f"{origin}: {e}") from None


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings: ``override`` wins key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = (
            merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


def write_settings(root: str | Path, defaults: Mapping[str, Any]) -> Path:
    """Add ``defaults`` to the settings file without overwriting what a user set there."""
    path = settings_path(root)
    data = merge(defaults, load_settings(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        f.write(
            "# Settings every run reads (UI, CLI, automation): ops.<asset>.config.<field>.\n"
            "# A run's own config wins over this file; this file wins over the defaults.\n"
        )
        yaml.safe_dump(data, f, sort_keys=False)
    return path
