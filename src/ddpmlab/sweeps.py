"""What a multirun leaves behind: a table of its runs and their loss curves, written when the sweep ends.

Registered as a Hydra callback (conf/hydra/default.yaml), so every `python train.py -m ...` writes, in its
sweep folder, `summary.csv`, `summary.md` (also printed) and `loss_curves.png`: one row and one curve per run,
labelled by the overrides that differ between runs.

Each run of a multirun records its outcome in `status.json` in its folder (ddpmlab.cli does, for every
launcher): a run that failed does not end the sweep, and its row says with what exit code and why.
"""

import csv
import json
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpmlab.plots import plot_loss_curves, read_curves

# The last logged value of each of these metrics, in a column named "<metric> (last)".
COLUMNS = ("train/loss", "train/mse", "train/vlb_bpd", "val/bpd")
LAST = tuple(f"{key} (last)" for key in COLUMNS)
# The columns that describe a run's outcome; every other column is an override that varies across the sweep.
OUTCOME = ("run", "steps", *LAST, "checkpoint", "status", "exit", "reason")
STATUS = "status.json"


def record_status(run_dir: Path, exit_code: int, reason: str) -> None:
    """A run's outcome in its folder: the exit code it would have had alone, and the one-line reason."""
    (Path(run_dir) / STATUS).write_text(json.dumps({"exit": exit_code, "reason": reason}) + "\n")


def read_status(run_dir: Path) -> dict:
    """{status: ok | failed | unknown, exit, reason}; unknown: no status.json (the run was killed, or never ended)."""
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return {"status": "unknown", "exit": "", "reason": "no status.json: the run was killed or is still running"}
    recorded = json.loads(path.read_text())
    return {"status": "ok" if recorded["exit"] == 0 else "failed", **recorded}


def summarise(sweep_dir: Path) -> list[dict]:
    """One row per run folder of the sweep: its varying overrides, steps, last metrics, checkpoint and outcome."""
    runs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                  key=lambda p: int(p.name) if p.name.isdigit() else p.name)
    overrides = {run: list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) for run in runs}
    varying = [o.split("=")[0] for o in dict.fromkeys(o for os in overrides.values() for o in os)]
    varying = [k for k in dict.fromkeys(varying)
               if len({next((o for o in os if o.split("=")[0] == k), "") for os in overrides.values()}) > 1]
    rows = []
    for run in runs:
        curves = read_curves(run / "csv" / "metrics.csv")
        row = {"run": run.name}
        row.update({k: next((o.split("=", 1)[1] for o in overrides[run] if o.split("=")[0] == k), "") for k in varying})
        row["steps"] = max((s for c in curves.values() for s, _ in c), default=0)
        for key, column in zip(COLUMNS, LAST):
            row[column] = curves[key][-1][1] if curves.get(key) else math.nan
        row["checkpoint"] = "yes" if (run / "checkpoints" / "last.ckpt").is_file() else "no"
        row.update(read_status(run))
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> str:
    """summary.csv, summary.md and loss_curves.png in the sweep folder; returns the markdown table."""
    rows = summarise(sweep_dir)
    if not rows:
        return ""
    keys = list(rows[0])
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    table = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                      + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir.name}\n\n{table}\n")
    _plot_losses(sweep_dir, rows, keys)
    return table


def _plot_losses(sweep_dir: Path, rows: list[dict], keys: list[str]) -> None:
    labelled = [k for k in keys if k not in OUTCOME]
    curves = {(", ".join(f"{k}={row[k]}" for k in labelled) or f"run {row['run']}"):
              read_curves(sweep_dir / row["run"] / "csv" / "metrics.csv").get("train/loss", []) for row in rows}
    plot_loss_curves(curves, sweep_dir / "loss_curves.png", f"sweep {sweep_dir.name}: {len(rows)} runs")


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, the summary of its runs (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            table = write_summary(sweep_dir)
            if table:
                print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}")
