"""Ho et al. 2020's Table 2 from a sweep: `python evaluate.py sweep_dir=PATH table=paper_table2`.

Every run of the sweep folder (`python train.py -m sweep=paper_table2`) is evaluated with one protocol, this
evaluate.py config: the same metrics, sample count, sampler and steps, the same noise for sample i in every run,
the same reference images and feature extractor. Each run's evaluation goes to <output>/run_<N>/ (metrics.json,
samples.png), and the table in the paper's layout, our numbers beside theirs, to table2.md and table2.json, with
table2_samples.png (each cell's first samples in the table's layout), and is printed. A run that diverged (exit 3,
NaN/Inf) is "unstable", as the paper records its blank cells; every run's checkpoint, counts and settings are
checked before the first network call.
"""

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import evaluate_prepared, prepare
from ddpmlab.plots import plot_table_samples
from ddpmlab.sweeps import summarise

TABLES = ("paper_table2",)
FIXED = ("fixed_large", "fixed_small")  # "fixed isotropic Sigma": sigma_t^2 I, beta_t (their CIFAR-10 choice) or beta~_t
# The table's rows, in its order: (prediction, loss, variances, group, objective, the paper's IS, its std, its FID)
# on unconditional CIFAR-10; None where the paper's cell is blank: "unstable to train" (Table 2's caption).
CELLS = (
    ("mean", "vlb", ("learned",), "μ̃ prediction (baseline)", "L, learned diagonal Σ", 7.28, 0.10, 23.69),
    ("mean", "vlb", FIXED, "μ̃ prediction (baseline)", "L, fixed isotropic Σ", 8.06, 0.09, 13.22),
    ("mean", "simple", FIXED, "μ̃ prediction (baseline)", "‖μ̃ − μ̃_θ‖²", None, None, None),
    ("eps", "vlb", ("learned",), "ε prediction (ours)", "L, learned diagonal Σ", None, None, None),
    ("eps", "vlb", FIXED, "ε prediction (ours)", "L, fixed isotropic Σ", 7.67, 0.13, 13.51),
    ("eps", "simple", FIXED, "ε prediction (ours)", "‖ε̃ − ε_θ‖² (L_simple)", 9.46, 0.11, 3.17),
)


def cell_of(diffusion) -> int | None:
    """The Table 2 row a run's diffusion config is, or None (another prediction, loss or weighting)."""
    if diffusion.get("loss_weighting", "none") != "none":
        return None
    return next((i for i, (prediction, loss, variances, *_) in enumerate(CELLS) if diffusion.prediction == prediction
                 and diffusion.loss == loss and diffusion.variance in variances), None)


def _runs(sweep: Path) -> list[dict]:
    """The sweep's runs (sweeps.summarise: outcome, steps), each with its cell and checkpoint."""
    if not sweep.is_dir():
        raise ConfigError(f"sweep_dir={sweep} is not a folder: give the folder `python train.py -m sweep=paper_table2` "
                          "wrote (runs/paper_table2/multirun_<date>)")
    runs = summarise(sweep)
    if not runs:
        raise ConfigError(f"sweep_dir={sweep} holds no runs (no <N>/.hydra/overrides.yaml): give the folder of a "
                          "multirun, `python train.py -m sweep=paper_table2`'s")
    for run in runs:
        folder = sweep / run["run"]
        run["diffusion"] = OmegaConf.load(folder / ".hydra" / "config.yaml").diffusion
        run["cell"] = cell_of(run["diffusion"])
        run["ckpt"] = folder / "checkpoints" / "last.ckpt"
    return runs


def _outcome(run: dict) -> str:
    """What the table says of a run that was not evaluated."""
    if run["status"] == "failed" and run["exit"] == 3:
        return "unstable"  # NaN/Inf in training (ddpmlab.cli: exit 3), the paper's blank cell
    if run["status"] == "failed":
        return f"failed (exit {run['exit']})"
    return "not finished" if run["status"] == "unknown" else "no checkpoint"


def evaluate_sweep(cfg: DictConfig) -> dict:
    """Evaluate every run of cfg.sweep_dir with cfg's protocol, then write and print Table 2 (module docstring)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if OmegaConf.is_list(cfg.sampler) or OmegaConf.is_list(cfg.sampling_steps):
        raise ConfigError(f"table={cfg.table} compares the runs at one setting: give one sampler and one "
                          f"sampling_steps, not sampler={cfg.sampler} sampling_steps={cfg.sampling_steps}")
    out = Path(cfg.paths.output_dir)
    runs = _runs(Path(cfg.sweep_dir))
    prepared = {}
    for run in runs:  # every check of every run before the first network call
        if run["status"] == "ok" and run["ckpt"].is_file():
            one = OmegaConf.merge(cfg, {"ckpt": str(run["ckpt"]), "sweep_dir": None, "table": None,
                                        "paths": {"output_dir": str(out / f"run_{run['run']}")}})
            prepared[run["run"]] = prepare(one)
    for run in runs:
        if run["run"] in prepared:
            print(f"\nTable 2: run {run['run']} ({_label(run)})")
            run["record"] = evaluate_prepared(*prepared.pop(run["run"]))
        else:
            run["record"] = None
    table = _table(cfg, runs)
    (out / "table2.json").write_text(json.dumps(table, indent=2))
    (out / "table2.md").write_text(_markdown(table))
    plot_table_samples(_panels(runs, out), out / "table2_samples.png",
                       f"Ho et al. Table 2 at small scale: the first samples of each run ({cfg.sweep_dir})")
    print(f"\n{_markdown(table)}\ntable: {out / 'table2.md'}; samples: {out / 'table2_samples.png'}")
    return table


def _label(run: dict) -> str:
    d = run["diffusion"]
    return f"prediction={d.prediction}, loss={d.loss}, variance={d.variance}"


def _values(record: dict | None) -> dict:
    """IS (with its std), FID, KID and the bound (full, else estimated) from one run's metrics.json record."""
    if record is None:
        return {}
    rows = {row["metric"]: row for row in record["results"]}
    bound = rows.get("nll (bits/dim)") or rows.get("nll_estimate (bits/dim)")
    pick = lambda name, key="value": rows[name].get(key) if name in rows else None  # noqa: E731
    return {"is": pick("is"), "is_std": pick("is", "std"), "fid": pick("fid"), "kid": pick("kid"),
            "bound_bpd": bound and bound["value"], "bound": bound and bound["metric"].split(" ")[0]}


def _table(cfg, runs: list[dict]) -> dict:
    rows = []
    for i, (_, _, _, group, objective, paper_is, paper_is_std, paper_fid) in enumerate(CELLS):
        mine = [run for run in runs if run["cell"] == i]
        for run in mine or [None]:
            rows.append({"group": group, "objective": objective, "paper_is": paper_is, "paper_is_std": paper_is_std,
                         "paper_fid": paper_fid, "run": run and run["run"], "steps": run and run["steps"],
                         "variance": run and run["diffusion"].variance,
                         "outcome": "not in this sweep" if run is None else "evaluated" if run["record"] else
                         _outcome(run), "reason": run and run["reason"], **_values(run and run["record"])})
    others = [{"run": run["run"], "what": _label(run), "outcome": "evaluated" if run["record"] else _outcome(run),
               **_values(run["record"])} for run in runs if run["cell"] is None]
    sampling = f"{cfg.sampler}, {cfg.sampling_steps or 'all T'} steps"
    protocol = (f"every run: metrics {list(cfg.metrics)}, {cfg.num_samples} samples ({sampling}, sample i from "
                f"the noise of (seed {cfg.seed}, i) in every run), features: {cfg.feature_extractor}, "
                f"{'EMA' if cfg.use_ema else 'raw'} weights")
    return {"sweep_dir": str(cfg.sweep_dir), "protocol": protocol, "rows": rows, "other_runs": others}


def _number(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown(table: dict) -> str:
    """The table in the paper's layout: its rows, their IS and FID on CIFAR-10, ours beside them."""
    lines = [f"Ho et al. 2020, Table 2, from the runs of {table['sweep_dir']}", "",
             f"Protocol: {table['protocol']}.", "",
             "| Objective | paper IS | paper FID | run | ours | IS | FID | KID | bound (bits/dim) |",
             "|---|---|---|---|---|---|---|---|---|"]
    group = None
    for row in table["rows"]:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| **{group}** | | | | | | | | |")
        paper_is = ("–" if row["paper_is"] is None else f"{row['paper_is']:.2f} ± {row['paper_is_std']:.2f}")
        ours = row["outcome"] if row["outcome"] != "evaluated" else "ok"
        is_ = _number(row.get("is")) + (f" ± {row['is_std']:.2f}" if row.get("is_std") is not None else "")
        bound = _number(row.get("bound_bpd"), 3) + (f" ({row['bound']})" if row.get("bound") else "")
        run = "" if row["run"] is None else f"{row['run']} ({row['variance']}, {row['steps']} steps)"
        lines.append(f"| {row['objective']} | {paper_is} | {_number(row['paper_fid'])} | {run} | {ours} | "
                     f"{is_} | {_number(row.get('fid'))} | {_number(row.get('kid'), 4)} | {bound} |")
    for row in table["other_runs"]:
        lines.append(f"| other run: {row['what']} | | | {row['run']} | {row['outcome']} | {_number(row.get('is'))} "
                     f"| {_number(row.get('fid'))} | {_number(row.get('kid'), 4)} | {_number(row.get('bound_bpd'), 3)} |")
    lines += ["", "The paper's numbers: unconditional CIFAR-10, 50k samples, Inception features; its blank cells "
              "(–) were unstable to train. Ours: the protocol above; 'unstable': training met NaN/Inf (exit 3)."]
    return "\n".join(lines) + "\n"


def _panels(runs: list[dict], out: Path) -> list[tuple[str, torch.Tensor | None, str]]:
    """(title, the first 16 samples uint8 or None, what to say instead) per cell, in the table's order."""
    panels = []
    for i, (_, _, _, group, objective, *_) in enumerate(CELLS):
        run = next((r for r in runs if r["cell"] == i), None)
        samples = out / f"run_{run['run']}" / "samples.pt" if run and run["record"] else None
        images = torch.load(samples, weights_only=True)[:16] if samples is not None and samples.is_file() else None
        said = ("not in this sweep" if run is None else _outcome(run) if not run["record"] else "no samples (no FID/IS/KID)")
        panels.append((f"{group.split(' ')[0]}: {objective}", images, said))
    return panels
