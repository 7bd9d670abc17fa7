"""``chaintune report RUN_DIR``: rebuild a run's self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run_dir: Annotated[Path, typer.Argument(help="A run directory written by align/transfer (runs/X).")],
    ):
        """Write RUN_DIR/report.html: config, metric curves, sample grids and a metric table (opens offline)."""
        from chaintune.run.report import build_report

        typer.echo(str(build_report(run_dir)))
