"""One line per asset with a Config: ``config = settings.resolve(context, config, lake)``.

The effective config of a step is the run's explicit config > ``<data root>/settings.yaml`` >
the Config defaults (``core/settings.py``), so runs launched by automation, from the UI or the
CLI all see the same settings.
"""

from typing import TypeVar

import dagster as dg

from gtex_assets.core.settings import SettingsError, effective_config, op_settings, settings_path
from gtex_assets.resources import DataLakeResource

C = TypeVar("C", bound=dg.Config)


def resolve(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    config: C,
    lake: DataLakeResource,
) -> C:
    root = lake.lake().root
    op = context.op_execution_context.op_def.name
    try:
        out = effective_config(
            config, op_settings(root, op), origin=f"{settings_path(root)} ops.{op}.config"
        )
    except SettingsError as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from e
    if out is not config:
        context.log.info(f"settings from {settings_path(root)} applied to {op}")
    return out
