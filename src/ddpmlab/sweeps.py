"""What a multirun leaves behind: a table of its runs and their loss curves, written when the sweep ends.

Registered as a Hydra callback (conf/hydra/default.yaml), so every `python train.py -m ...` writes, in its
sweep folder, `summary.csv`, `summary.md` (also printed) and `loss_curves.png`: one row and one curve per run,
labelled by the overrides that differ between runs.

Each run of a multirun records its outcome in `status.json` in its folder (ddpmlab.cli does, for every
launcher): a run that failed does not end the sweep, and its row says with what exit code and why.

An Optuna search (`-m hparams_search=optuna`, its study in the sweep folder) adds, from the study: each run's
objective (run folder N is trial N), the best run with the command that repeats it (printed and in summary.md),
and `objective.png`, the objective per trial.
"""

import csv
import json
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpmlab.plots import plot_loss_curves, plot_objective, read_curves

# The last logged value of each of these metrics, in a column named "<metric> (last)".
COLUMNS = ("train/loss", "train/mse", "train/vlb_bpd", "val/bpd")
LAST = tuple(f"{key} (last)" for key in COLUMNS)
# The columns that describe a run's outcome; every other column is an override that varies across the sweep.
OUTCOME = ("run", "steps", "objective", *LAST, "checkpoint", "status", "exit", "reason")
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


def summarise(sweep_dir: Path, objectives: dict[str, float] | None = None) -> list[dict]:
    """One row per run folder of the sweep: its varying overrides, steps, objective (a search's: {run: value}),
    last metrics, checkpoint and outcome."""
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
        if objectives is not None:
            row["objective"] = objectives.get(run.name, math.nan)
        for key, column in zip(COLUMNS, LAST):
            row[column] = curves[key][-1][1] if curves.get(key) else math.nan
        row["checkpoint"] = "yes" if (run / "checkpoints" / "last.ckpt").is_file() else "no"
        row.update(read_status(run))
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, study=None, metric: str = "objective") -> str:
    """summary.csv, summary.md and loss_curves.png in the sweep folder; returns the markdown table. With an Optuna
    study (see load_study), also its objective column, the best run and objective.png."""
    trials = [t for t in study.trials if t.value is not None] if study is not None else []
    rows = summarise(sweep_dir, {str(t.number): t.value for t in trials} if study is not None else None)
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
    on_train = _val_on_training_images(sweep_dir, rows)
    if on_train:
        table += (f"\n\nval/bpd of run{'s' if len(on_train) > 1 else ''} {', '.join(on_train)} is measured on "
                  "training images (the data has no held-out split), so it cannot show overfitting: give data.root a "
                  "test/ folder, or set data.test_fraction=0.1")
    if study is not None:
        table += "\n\n" + _search_results(sweep_dir, study, trials, metric)
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir.name}\n\n{table}\n")
    _plot_losses(sweep_dir, rows, keys)
    return table


def _val_on_training_images(sweep_dir: Path, rows: list[dict]) -> list[str]:
    """The runs whose val/bpd is on training images: their data has no held-out split (ddpmlab.data)."""
    from ddpmlab.data import NO_HELD_OUT, test_split_label

    found = []
    for row in rows:
        saved = sweep_dir / row["run"] / "config_resolved.yaml"  # written once training starts
        if math.isnan(row["val/bpd (last)"]) or not saved.is_file():
            continue
        data = OmegaConf.load(saved).data
        if test_split_label(data.dataset, data.root, data.get("test_fraction", 0.0), data.get("split_seed", 0),
                            data.get("path")) == NO_HELD_OUT:
            found.append(row["run"])
    return found


def load_study(config: DictConfig):
    """The Optuna study a search kept in storage (hydra.sweeper.storage and study_name); None for a grid."""
    storage, name = (OmegaConf.select(config, f"hydra.sweeper.{k}") for k in ("storage", "study_name"))
    if not storage or not name:
        return None
    import optuna  # the `search` extra: only a search needs it

    return optuna.load_study(study_name=name, storage=storage)


def _search_results(sweep_dir: Path, study, trials: list, metric: str) -> str:
    """The best run and the command that repeats it, and objective.png; the objective is `metric` (optimized_metric)."""
    direction = study.direction.name.lower()
    plot_objective([(t.number, t.value) for t in trials], direction, sweep_dir / "objective.png", metric,
                   f"search {sweep_dir.name}: {len(trials)} of {len(study.trials)} trials gave a value")
    if not trials:
        return f"No trial gave a value of {metric}: the rows above say why."
    best = study.best_trial
    overrides = OmegaConf.load(sweep_dir / str(best.number) / ".hydra" / "overrides.yaml")
    return (f"Best ({direction} {metric}): run {best.number}, {metric} = {best.value:.4f}; its config: "
            f"{sweep_dir / str(best.number) / '.hydra' / 'config.yaml'}\n\n"
            f"    python train.py {' '.join(str(o) for o in overrides if not str(o).startswith('hparams_search='))}")


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
            metric = OmegaConf.select(config, "optimized_metric") or "objective"
            table = write_summary(sweep_dir, load_study(config), metric)
            if table:
                print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}")
