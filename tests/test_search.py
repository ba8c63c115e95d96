"""Hyper-parameter search (`python train.py -m hparams_search=...`): Hydra's Optuna sweeper with its study in the
sweep folder, under each launcher, resumable, and what it leaves behind."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ddpmlab.plots import read_curves
from ddpmlab.sweeps import write_summary
from tests.conftest import REFUSALS, ROOT, refusal_cases

SPACE = {"optim.lr", "optim.ema_decay", "schedule", "diffusion.prediction", "diffusion.loss_weighting"}


def compose_search(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("launcher, n_jobs", [("basic", 1), ("local_parallel", 2), ("slurm", 1)])
def test_search_keeps_its_study_in_the_sweep_folder_under_each_launcher(launcher, n_jobs):
    cfg = compose_search("hparams_search=optuna", f"hydra/launcher={launcher}", "hydra.sweep.dir=/tmp/sweep")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.ddpmlab_search.ResumableOptunaSweeper"
    assert (sweeper.storage, sweeper.study_name, sweeper.direction) == ("sqlite:////tmp/sweep/optuna.db", "ddpm",
                                                                        "minimize")
    assert sweeper.n_jobs == n_jobs  # trials per launch = the launcher's parallelism
    assert set(sweeper.params) == SPACE and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.optimized_metric == "val/bpd"
    cpu = compose_search("hparams_search=optuna_cpu", f"hydra/launcher={launcher}").hydra.sweeper
    assert cpu.n_trials == 4 and SPACE < set(cpu.params) and cpu.params["trainer.max_steps"] == "200"


def test_every_value_of_the_search_space_composes():
    """A trial's overrides are the space's values: each choice names a real option (a group's) or value."""
    for key, space in compose_search("hparams_search=optuna").hydra.sweeper.params.items():
        override = OverridesParser.create().parse_override(f"{key}={space}")
        if not override.is_choice_sweep():
            assert isinstance(OmegaConf.select(compose_search(), key), float), key  # an interval over a number
            continue
        for value in override.sweep_string_iterator():
            cfg = compose_search(f"{key}={value}")
            choices = cfg.hydra.runtime.choices  # a config group's option, or a key's value
            assert str(choices[key] if key in choices else OmegaConf.select(cfg, key)) == value, (key, value)


def search_argv(tmp_path, *overrides: str) -> list[str]:
    """The CPU preset on the smoke experiment, shrunk to seconds a trial."""
    return [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna_cpu", "experiment=smoke",
            "trainer.max_steps=2", "val.num_images=8", "val.batch_size=8", "callbacks.sample_grid.num_samples=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def search(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(search_argv(tmp_path, *overrides), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_search_runs_resumes_and_reports_its_trials_and_best_config(tmp_path):
    """2 trials in parallel (local_parallel), then the same command with n_trials=3 on the same sweep folder: one
    more trial (not 3 more), in folder 2 (folders 0 and 1 stay the first start's). The study's values are the
    val/bpd each run logged; summary.md, objective.png and the printed best config agree with the study."""
    first = search(tmp_path, "hydra/launcher=local_parallel", "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweep"
    first_overrides = [(sweep / run / ".hydra" / "overrides.yaml").read_text() for run in ("0", "1")]
    second = search(tmp_path, "hydra.sweeper.n_trials=3")
    assert second.returncode == 0, second.stderr[-3000:]

    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{sweep}/optuna.db")
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert [(sweep / run / ".hydra" / "overrides.yaml").read_text() for run in ("0", "1")] == first_overrides
    for trial in study.trials:
        run = sweep / str(trial.number)
        overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
        assert {f"{k}={v}" for k, v in trial.params.items()} <= set(overrides)  # folder N ran trial N
        assert trial.value == pytest.approx(read_curves(run / "csv" / "metrics.csv")["val/bpd"][-1][1], rel=1e-6)

    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok"), ("2", "ok")]
    assert [float(r["objective"]) for r in rows] == pytest.approx([t.value for t in study.trials], rel=1e-6)
    best = study.best_trial
    assert best.value == min(t.value for t in study.trials)
    results = OmegaConf.load(sweep / "optimization_results.yaml")  # the sweeper's own record
    assert results.best_value == best.value and dict(results.best_params) == best.params
    best_overrides = [o for o in OmegaConf.load(sweep / str(best.number) / ".hydra" / "overrides.yaml")
                      if not o.startswith("hparams_search=")]
    command = f"python train.py {' '.join(best_overrides)}"
    assert f"run {best.number}, val/bpd = {best.value:.4f}" in second.stdout and command in second.stdout
    assert command in (sweep / "summary.md").read_text()
    assert (sweep / "objective.png").stat().st_size > 5000


@pytest.mark.slow
def test_a_killed_search_resumes_with_the_trials_it_lacks(tmp_path):
    """Killed (SIGKILL) while trial 0 trains: the rerun records trial 0 as failed, runs trials 1 and 2 for the 2
    trials asked, and ends with exit 4 naming run 0 as killed (the summary's usual account of a run that died)."""
    sweep = tmp_path / "sweep"
    killed = subprocess.Popen(search_argv(tmp_path, "hydra.sweeper.n_trials=2"), cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (sweep / "0" / ".hydra" / "overrides.yaml").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = search(tmp_path, "hydra.sweeper.n_trials=2")
    assert resumed.returncode == 4, resumed.stderr[-3000:]
    assert resumed.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 runs failed, run 0 (exit ?)")
    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{sweep}/optuna.db")
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert all((sweep / run / "status.json").is_file() for run in ("1", "2"))
    assert f"run {study.best_trial.number}, val/bpd" in (sweep / "summary.md").read_text()


# A grid over the refusal cases (tests.conftest.REFUSALS), with the project's sweeper and optuna's grid sampler.
GRID_SEARCH = """# @package _global_
defaults:
  - override /hydra/sweeper: ddpmlab_optuna
  - override /hydra/sweeper/sampler: grid
hydra:
  mode: MULTIRUN
  sweeper:
    storage: sqlite:///${hydra.sweep.dir}/optuna.db
    study_name: refusals
    direction: minimize
    n_trials: 10
    params:
      +case: choice(%s)
"""


@pytest.mark.slow
def test_a_search_goes_on_past_every_kind_of_refused_trial(tmp_path):
    """Each refusal class before training, in a trial of an Optuna search: every trial runs (optuna's grid
    sampler, so each case once, the refused last one included), a refused trial is a failed one with its reason,
    the trial that trains gives the best value, and the search exits 4 naming the failed runs."""
    cases = [name for name in REFUSALS if name != "diverges"]
    searchpath = refusal_cases(tmp_path / "conf")
    (tmp_path / "conf" / "hparams_search").mkdir()
    (tmp_path / "conf" / "hparams_search" / "refusals.yaml").write_text(GRID_SEARCH % ",".join(cases))
    argv = [sys.executable, str(ROOT / "train.py"), "hparams_search=refusals", searchpath, "experiment=smoke",
            "trainer.max_steps=2", "val.num_images=8", "val.batch_size=8", "callbacks.sample_grid.num_samples=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 4, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {len(cases) - 1} of {len(cases)} runs failed")
    study = optuna.load_study(study_name="refusals", storage=f"sqlite:///{tmp_path}/sweep/optuna.db")
    assert sorted(t.params["+case"] for t in study.trials) == sorted(cases)
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for trial, row in zip(study.trials, rows):
        case = trial.params["+case"]
        assert (row["+case"], row["status"]) == (case, "ok" if case == "ok" else "failed")
        assert trial.state.name == ("COMPLETE" if case == "ok" else "FAIL")
        assert row["reason"].startswith(REFUSALS[case][1]), (case, row["reason"])
    assert f"run {study.best_trial.number}, val/bpd" in (tmp_path / "sweep" / "summary.md").read_text()
    assert "Traceback" not in done.stderr and "Got 'None'" not in done.stderr


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_ends_with_its_summary(tmp_path):
    """A refused fixed param fails every trial: both trials still run, summary.md says why each failed, exit 4
    (optuna's study.best_trial had ended it in a traceback)."""
    done = search(tmp_path, "hydra.sweeper.n_trials=2", "data.batch_size=0")
    assert done.returncode == 4, done.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: 2 of 2 runs failed, run 0 (exit 2), run 1 (exit 2): {sweep / 'summary.md'} says why")
    summary = (sweep / "summary.md").read_text()
    assert summary.count("error: data.batch_size must be a positive integer, got 0") == 2
    assert "No trial gave a value of val/bpd" in summary and "Traceback" not in done.stderr
    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]


def test_summary_of_a_search_gives_each_runs_objective_and_the_best_runs_command(tmp_path):
    """Run folders as a search leaves them, with its study: a failed trial has no objective and is never the best."""
    study = optuna.create_study(study_name="ddpm", storage=f"sqlite:///{tmp_path}/optuna.db")
    for number, (lr, value) in enumerate([("1e-3", 2.0), ("1e5", None), ("3e-4", 1.5)]):
        (tmp_path / str(number) / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"optim.lr={lr}", "hparams_search=optuna_cpu", "experiment=smoke"]),
                       tmp_path / str(number) / ".hydra" / "overrides.yaml")
        trial = study.ask()
        state = optuna.trial.TrialState.FAIL if value is None else optuna.trial.TrialState.COMPLETE
        study.tell(trial, value, state=state)
    table = write_summary(tmp_path, study, "val/bpd")
    with open(tmp_path / "summary.csv", newline="") as f:
        objectives = [float(row["objective"]) for row in csv.DictReader(f)]
    assert objectives == pytest.approx([2.0, math.nan, 1.5], nan_ok=True)
    assert "| 2 | 3e-4 | 0 | 1.5000 |" in table
    assert "run 2, val/bpd = 1.5000" in table and "    python train.py optim.lr=3e-4 experiment=smoke" in table
    assert (tmp_path / "objective.png").stat().st_size > 5000

    failed = optuna.create_study(study_name="failed", storage=f"sqlite:///{tmp_path}/optuna.db")
    failed.tell(failed.ask(), state=optuna.trial.TrialState.FAIL)
    assert "No trial gave a value of val/bpd" in write_summary(tmp_path, failed, "val/bpd")


DEFAULT_RUN_SPACE = {"optim.lr", "optim.ema_decay", "optim.warmup_steps", "schedule", "model.dropout"}


def test_the_default_run_search_varies_only_what_keeps_a_plain_ddpm_at_its_budget():
    """hparams_search=optuna_default_run: the default run's own steps and batch, eps prediction and no loss
    weighting held, the default recipe itself first."""
    cfg = compose_search("hparams_search=optuna_default_run")
    sweeper = cfg.hydra.sweeper
    spaces = {k for k, v in sweeper.params.items() if "(" in str(v)}
    assert spaces == DEFAULT_RUN_SPACE and sweeper.baseline_first
    assert (sweeper.params["diffusion.prediction"], sweeper.params["diffusion.loss_weighting"]) == ("eps", "none")
    assert (cfg.trainer.max_steps, cfg.data.batch_size) == tuple(
        OmegaConf.select(compose_search(), k) for k in ("trainer.max_steps", "data.batch_size"))
    assert not compose_search("hparams_search=optuna").hydra.sweeper.baseline_first


def default_run_search(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna_default_run", "experiment=smoke",
            "trainer.max_steps=2", "val.num_images=8", "val.batch_size=8", "callbacks.sample_grid.num_samples=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    return subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_baseline_first_makes_trial_0_the_composed_recipe(tmp_path):
    """Trial 0 runs each searched key at its composed value (the smoke experiment's); trial 1 is the sampler's
    own. A searched key given on the command line (schedule) is fixed for every trial, trial 0 included."""
    done = default_run_search(tmp_path, "schedule=cosine", "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{tmp_path}/sweep/optuna.db")
    composed = compose_search("experiment=smoke")
    assert study.trials[0].params == {"optim.lr": composed.optim.lr, "optim.ema_decay": composed.optim.ema_decay,
                                      "optim.warmup_steps": composed.optim.warmup_steps,
                                      "model.dropout": composed.model.dropout}
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[1].params != study.trials[0].params
    assert "setup plugin" not in done.stdout + done.stderr  # alembic's INFO lines, from opening the study
    for run in ("0", "1"):
        assert "schedule=cosine" in OmegaConf.load(tmp_path / "sweep" / run / ".hydra" / "overrides.yaml")


def test_a_baseline_outside_the_searched_space_is_one_line_before_any_file(tmp_path):
    """The paper's CIFAR-10 rate 2e-4 is below the searched 3e-4 to 4e-3: exit 2, one line that names the key and
    the way out, no sweep folder. A searched key given on the command line is fixed, so it is no such case."""
    done = default_run_search(tmp_path, "experiment=ddpm_cifar10", "hydra.sweeper.n_trials=2")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: hydra.sweeper.baseline_first: optim.lr=0.0002 is outside the searched")
    assert "hydra.sweeper.baseline_first=false" in line and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_baseline_killed_before_it_completed_runs_again_on_resume(tmp_path):
    """Killed (SIGKILL) while trial 0, the baseline, trains: the resumed search records trial 0 as failed and asks
    the baseline again as trial 1, then one trial of the sampler's own; the baseline's row is not lost."""
    sweep = tmp_path / "sweep"
    argv = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna_default_run", "experiment=smoke",
            "trainer.max_steps=2", "val.num_images=8", "val.batch_size=8", "callbacks.sample_grid.num_samples=2",
            f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2"]
    killed = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 600
    while not (sweep / "0" / ".hydra" / "overrides.yaml").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = default_run_search(tmp_path, "hydra.sweeper.n_trials=2")
    assert resumed.returncode == 4, resumed.stderr[-3000:]  # run 0 was killed: the summary's usual account
    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{sweep}/optuna.db")
    composed = compose_search("experiment=smoke")
    baseline = {"optim.lr": composed.optim.lr, "optim.ema_decay": composed.optim.ema_decay,
                "optim.warmup_steps": composed.optim.warmup_steps, "model.dropout": composed.model.dropout,
                "schedule": "linear"}
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].params == baseline and study.trials[2].params != baseline
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"]) for r in rows] == [("0", "unknown"), ("1", "ok"), ("2", "ok")]
