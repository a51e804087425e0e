"""The `gtex-assets` command."""

from gtex_assets.cli.main import main

__all__ = ["main"]
