"""The tissue_classifier asset and its blocking check, materialised on a tiny generated tile
sample: tables, checkpoints, plots, metadata, idempotent re-runs, and a gate that fails a
model predicting one tissue."""

import dagster as dg
import pandas as pd
import pytest
import torch

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.lake import Lake
from gtex_assets.defs.model.assets import tissue_classifier
from gtex_assets.defs.model.checks import (
    selected_classifier_beats_chance,
    tissue_classifier_beats_chance,
)
from gtex_assets.defs.model.configs import TissueClassifierConfig
from gtex_assets.lib.model.backbones import load_checkpoint
from gtex_assets.resources import DataLakeResource
from gtex_assets_tests.lib.model.test_training import make_tile_table

RUN_CONFIG = {
    "backbone": "efficientnet_lite0",
    "weights": "package",
    "input_size": 64,
    "batch_size": 8,
    "epochs": 3,
    "lr": 1e-3,
    "checkpoint_epochs": [1],
    "n_workers": 0,
    "num_threads": 1,
}


def _run_config(asset=True, **overrides):
    asset_cfg = {"tissue_classifier": {"config": {**RUN_CONFIG, **overrides}}} if asset else {}
    return {
        "ops": {
            **asset_cfg,
            # A check's op is named <asset>_<check>.
            "tissue_classifier_tissue_classifier_beats_chance": {
                "config": {"device": "cpu", "n_workers": 0}
            },
        }
    }


def _materialize(root, run_config, selection=None, raise_on_error=True):
    return dg.materialize(
        [tissue_classifier, tissue_classifier_beats_chance],
        resources={"lake": DataLakeResource(root=str(root))},
        instance=dg.DagsterInstance.ephemeral(),
        run_config=run_config,
        selection=selection,
        raise_on_error=raise_on_error,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data root with a balanced_tile_sample and a materialised classifier (3 epochs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lake")
    lk = Lake.at(root)
    write_parquet(make_tile_table(root / "tiles"), lk.table("balanced_tile_sample"))
    result = _materialize(root, _run_config())
    yield lk, result
    torch.set_num_threads(n)


def test_config_defaults_are_the_spec():
    cfg = TissueClassifierConfig().train_config()
    assert (cfg.backbone, cfg.lr, cfg.epochs, cfg.batch_size) == ("efficientnet_b0", 1e-4, 30, 32)
    assert cfg.kept_epochs() == [5, 10, 20, 30] and cfg.selected() == 30
    assert (cfg.input_size, cfg.weights, cfg.allow_random_init, cfg.random_state) == (
        224,
        "imagenet",
        False,
        0,
    )


def test_config_mirrors_every_train_config_field():
    """Every TrainConfig field is a config field of the same name and default (no drift)."""
    import dataclasses

    from gtex_assets.lib.model.training import TrainConfig

    ui = TissueClassifierConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        value = getattr(ui, f.name)
        assert (tuple(value) if isinstance(value, list) else value) == default, f.name


def test_asset_spec():
    spec = tissue_classifier.specs_by_key[dg.AssetKey("tissue_classifier")]
    assert {k.to_user_string() for k in tissue_classifier.keys} == {
        "tissue_classifier", "classifier_epochs", "classifier_checkpoints",
        "classifier_confusion", "classifier_sweep",
    }  # fmt: skip
    assert spec.group_name == "model" and "pytorch" in spec.kinds
    assert tissue_classifier.op.pool == "gpu" and spec.code_version
    assert [d.asset_key for d in spec.deps] == [dg.AssetKey("balanced_tile_sample")]
    check = next(iter(tissue_classifier_beats_chance.check_specs))
    assert check.blocking and check.asset_key == dg.AssetKey("tissue_classifier")


def test_classifier_writes_tables_checkpoints_and_plots(trained):
    lk, result = trained
    assert result.success
    md = result.asset_materializations_for_node("tissue_classifier")[0].metadata
    assert md["slide_test_acc"].value == 1.0 and md["test_acc"].value >= 0.85
    assert md["weights_source"].value.startswith("package:")
    assert md["selected_epoch"].value == 3 and md["resumed_after_epoch"].value == 0
    assert isinstance(md["test_macro_f1"].value, float) and "![" in md["confusion"].value

    epochs = pd.read_parquet(lk.table("classifier_epochs"))
    assert epochs["epoch"].tolist() == [1, 2, 3]
    assert {"test_balanced_acc", "test_macro_f1", "slide_test_acc", "lr", "seconds"} <= set(
        epochs.columns
    )
    ck = pd.read_parquet(lk.table("classifier_checkpoints"))
    assert ck["epoch"].tolist() == [1, 3] and ck["selected"].tolist() == [False, True]
    sel = ck[ck["selected"]].iloc[0]
    assert sel["model_id"] == md["model_id"].value and sel["model_id"].startswith(
        "efficientnet_lite0-ft-e003-"
    )
    model, card = load_checkpoint(sel["path"])
    assert card["classes"] == ["Tissue A", "Tissue B", "Tissue C"] and card["epoch"] == 3
    # The checkpoints table is the one record of the selected model: no pointer file beside it.
    assert not (lk.models / "tissue_classifier" / "selected.json").exists()
    keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"tissue_classifier", "classifier_epochs", "classifier_checkpoints",
            "classifier_confusion"} <= keys and "classifier_sweep" not in keys  # fmt: skip
    ck_md = result.asset_materializations_for_node("tissue_classifier")
    schema = next(m for m in ck_md if m.asset_key.path == ["classifier_checkpoints"]).metadata
    assert schema["dagster/table_name"].value == "gtex.main.classifier_checkpoints"
    cols = {c.name: c for c in schema["dagster/column_schema"].schema.columns}
    assert {"model_id", "selected", "path"} <= set(cols) and cols["selected"].description

    conf = pd.read_parquet(lk.table("classifier_confusion"))
    sel_conf = conf[conf["model_id"] == sel["model_id"]]
    totals = sel_conf.groupby("level")["count"].sum().to_dict()
    assert totals == {"tile": 36, "slide": 6}  # test: 3 tissues x 2 slides x 6 tiles
    assert set(conf["true_tissue"]) == {"Tissue A", "Tissue B", "Tissue C"}
    assert (lk.plots / "tissue_classifier" / f"{sel['model_id']}_confusion.png").is_file()

    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1 and checks[0].passed
    assert checks[0].metadata["test_acc"].value >= 0.85


def test_rematerialising_reuses_the_finished_run(trained):
    lk, _ = trained
    before = pd.read_parquet(lk.table("classifier_epochs"))
    again = _materialize(lk.root, _run_config())
    md = again.asset_materializations_for_node("tissue_classifier")[0].metadata
    assert md["resumed_after_epoch"].value == 3  # nothing trained again
    after = pd.read_parquet(lk.table("classifier_epochs"))
    pd.testing.assert_frame_equal(before, after)


def test_check_fails_on_a_model_that_predicts_one_tissue(trained, tmp_path):
    lk, _ = trained
    sel = pd.read_parquet(lk.table("classifier_checkpoints")).query("selected").iloc[0]
    path = sel["path"]
    original = torch.load(path, weights_only=True)
    broken = dict(original)
    broken["head.weight"] = torch.zeros_like(original["head.weight"])
    broken["head.bias"] = torch.tensor([9.0, 0.0, 0.0])
    torch.save(broken, path)
    try:
        res = selected_classifier_beats_chance(lk, margin=0.2, device="cpu")
        assert not res.passed
        assert res.metadata["test_acc"].value == pytest.approx(1 / 3, abs=1e-4)
        assert res.metadata["threshold"].value == pytest.approx(1 / 3 + 0.2, abs=1e-4)
        # Through Dagster: only the check runs, and it fails (blocking, severity ERROR).
        run = _materialize(
            lk.root,
            _run_config(asset=False),
            selection=dg.AssetSelection.checks(tissue_classifier_beats_chance),
            raise_on_error=False,
        )
        evals = run.get_asset_check_evaluations()
        assert len(evals) == 1 and not evals[0].passed
        assert not run.asset_materializations_for_node("tissue_classifier")
    finally:
        torch.save(original, path)


def test_missing_input_and_unavailable_weights_fail_clearly(tmp_path, monkeypatch):
    res = _materialize(tmp_path, _run_config(), raise_on_error=False)
    assert not res.success
    failure = next(e for e in res.all_events if e.is_step_failure)
    assert "balanced_tile_sample" in failure.step_failure_data.error.message
    lk = Lake.at(tmp_path)
    write_parquet(make_tile_table(tmp_path / "tiles", slides_per_tissue=2, tiles_per_slide=2),
                  lk.table("balanced_tile_sample"))  # fmt: skip
    res = _materialize(
        tmp_path, _run_config(backbone="resnet50", weights="package"), raise_on_error=False
    )
    failure = next(e for e in res.all_events if e.is_step_failure)
    assert "no package ships" in failure.step_failure_data.error.message
