from pathlib import Path

import dagster as dg

from gtex_assets.defs.automation import apply_automation


@dg.definitions
def defs() -> dg.Definitions:
    # Automation conditions, source deps and freshness from the graph (defs/automation.py).
    return apply_automation(dg.load_from_defs_folder(path_within_project=Path(__file__).parent))
