"""The settings file: run config > settings > defaults, field by field."""

import pytest
from pydantic import BaseModel

from gtex_assets.core.settings import (
    SettingsError,
    effective_config,
    load_settings,
    op_settings,
    settings_path,
    write_settings,
)


class Cfg(BaseModel):
    epochs: int = 30
    lr: float = 1e-4
    tissues: list[str] = []


def test_explicit_fields_win_over_settings_which_win_over_defaults():
    explicit = Cfg(lr=0.5)  # a run config that set lr only
    out = effective_config(explicit, {"epochs": 3, "lr": 0.1})
    assert (out.epochs, out.lr, out.tissues) == (3, 0.5, [])
    assert effective_config(Cfg(), {}) == Cfg()


def test_unknown_or_invalid_settings_name_the_origin():
    with pytest.raises(SettingsError, match=r"settings.yaml ops.x.config: unknown field.*epoch"):
        effective_config(Cfg(), {"epoch": 3}, origin="settings.yaml ops.x.config")
    with pytest.raises(SettingsError, match="epochs"):
        effective_config(Cfg(), {"epochs": "many"})


def test_file_round_trip_keeps_what_the_user_set(tmp_path):
    assert load_settings(tmp_path) == {} and op_settings(tmp_path, "a") == {}
    settings_path(tmp_path).write_text("ops:\n  a:\n    config: {epochs: 7}\n")
    write_settings(tmp_path, {"ops": {"a": {"config": {"epochs": 3, "lr": 0.01}}, "b": {}}})
    assert op_settings(tmp_path, "a") == {"epochs": 7, "lr": 0.01}  # the user's 7 is kept
    assert op_settings(tmp_path, "b") == {}


@pytest.mark.parametrize(
    "text, match",
    [("ops: [1, 2]\n", "mapping with an 'ops:'"), ("ops:\n  a: {config: 3}\n", "ops.a.config"),
     ("ops: {a: [\n", "not valid YAML")],
)  # fmt: skip
def test_bad_files_say_what_is_wrong(tmp_path, text, match):
    settings_path(tmp_path).write_text(text)
    with pytest.raises(SettingsError, match=match):
        op_settings(tmp_path, "a")
