"""Hydra's Optuna sweeper with its study in the sweep folder, resumable (conf/hparams_search/optuna.yaml).

hydra-optuna-sweeper does the search; this subclass only corrects where a start begins, because the stock one
cannot resume a study kept in its own sweep folder:
- the sweep folder is made first (Hydra's launcher makes it only after the sweeper opened the sqlite file, which
  then fails with "unable to open database file");
- n_trials is the study's total: a start runs only the trials the stored study lacks (the stock sweeper runs
  n_trials more on every start);
- run folders continue from the study's trial count, so folder N holds Optuna's trial N and a second start never
  writes into the first one's folders (the stock sweeper numbers every start from 0);
- a trial a killed start left running is recorded as failed and does not count as done.
It adds one option, `baseline_first` (conf/hparams_search/optuna_default_run.yaml): a new study's trial 0 runs the
composed configuration itself, each searched key at its composed value, so the table shows what the search gained.

Hydra instantiates sweepers only from the hydra_plugins namespace, hence this package's place.
"""

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    @dataclass
    class ResumableOptunaSweeperConf(OptunaSweeperConf):
        """hydra/sweeper=ddpmlab_optuna: the Optuna sweeper's options, and baseline_first (module docstring)."""

        _target_: str = "hydra_plugins.ddpmlab_search.ResumableOptunaSweeper"
        baseline_first: bool = False

    ConfigStore.instance().store(group="hydra/sweeper", name="ddpmlab_optuna", node=ResumableOptunaSweeperConf,
                                 provider="ddpmlab")
except ImportError:  # no `search` extra: Hydra imports every plugin on each start, and would warn each time
    OptunaSweeper = object  # a plain class, which Hydra does not take for a plugin


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's OptunaSweeper, started where its stored study left off (module docstring)."""

    def __init__(self, *args, baseline_first: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.baseline_first = baseline_first

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl").addFilter(_say_failed_run)
        search = self.sweeper
        baseline = composed_values(search, config) if self.baseline_first else None  # checked before any file
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        if search.storage is None or search.study_name is None:
            return
        import optuna  # only once a search starts: Hydra imports every plugin on every start

        try:
            study = optuna.load_study(study_name=search.study_name, storage=search.storage)
        except KeyError:  # no such study yet: a first start
            if baseline is not None:
                study = optuna.create_study(study_name=search.study_name, storage=search.storage,
                                            directions=search._get_directions())
                _enqueue(study, baseline)
            return
        trials = study.get_trials(deepcopy=False)
        state = optuna.trial.TrialState
        killed = [t.number for t in trials if t.state == state.RUNNING]
        for number in killed:
            study.tell(number, state=state.FAIL)
        search.n_trials = max(search.n_trials - (len(trials) - len(killed)), 0)
        search.job_idx = len(trials)
        if hasattr(search.sampler, "reseed_rng"):  # a fixed seed would replay the first start's random trials
            search.sampler.reseed_rng()
        # A baseline that never completed (its start was killed, or it failed) is asked again, as the next trial
        if baseline is not None and search.n_trials and not any(
                t.system_attrs.get("fixed_params") == baseline and t.number not in killed
                and t.state in (state.COMPLETE, state.WAITING) for t in trials):
            _enqueue(study, baseline)

    def sweep(self, arguments: list[str]) -> None:
        """The stock sweep, but a search in which no trial gave a value ends with its summary (each failed run's
        reason, exit 4) instead of optuna's "Record does not exist." from study.best_trial."""
        try:
            with _grid_end_tolerated():
                self.sweeper.sweep(arguments)
        except ValueError:
            search = self.sweeper
            if search.storage is None or search.study_name is None:
                raise
            import optuna

            study = optuna.load_study(study_name=search.study_name, storage=search.storage)
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                raise


@contextmanager
def _grid_end_tolerated():
    """optuna's GridSampler calls study.stop() on the trial that completes the grid, which outside study.optimize
    raises; hydra-optuna-sweeper tolerates that only for a trial that gave a value, so a grid search whose last
    trial failed ended in a traceback. The sweeper runs no more trials than the grid has: outside optimize the
    stop is dropped."""
    from optuna.study import Study

    stop = Study.stop

    def stop_inside_optimize(study) -> None:
        if study._optimize_lock.locked():
            stop(study)

    Study.stop = stop_inside_optimize
    try:
        yield
    finally:
        Study.stop = stop


def _say_failed_run(record: logging.LogRecord) -> bool:
    """The stock sweeper's warning for a trial whose run failed (train.py returned None) says what happened."""
    if "Got 'None'" in str(record.msg):
        record.msg, record.args = "Failed experiment: the run failed; its status.json (and summary.md) say why", ()
    return True


def _enqueue(study, params: dict) -> None:
    """study.enqueue_trial(params), without the ExperimentalWarning optuna 2.10 prints on the user's terminal."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.enqueue_trial(params)


def composed_values(search, config) -> dict:
    """The composed configuration's value of each key the search varies (a config group's: its option's name), as
    fixed values for optuna's enqueue_trial.

    A value outside its key's search space cannot be trial 0: a ConfigError names the key and the space.
    """
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from omegaconf import OmegaConf

    from ddpmlab.errors import ConfigError

    search._process_searchspace_config()  # the spaces as sweep() will make them: a command-line value fixes its key
    spaces, fixed = create_params_from_overrides(search._parse_sweeper_params_config() +
                                                 list(config.hydra.overrides.task))
    spaces = {key: space for key, space in spaces.items() if key not in fixed}
    choices = config.hydra.runtime.choices  # a config group's chosen option
    values = {}
    for key, space in spaces.items():
        value = choices[key] if key in choices else OmegaConf.select(config, key)
        try:
            inside = space._contains(space.to_internal_repr(value))
        except ValueError:  # a choice the space does not list
            inside = False
        if not inside:
            raise ConfigError(f"hydra.sweeper.baseline_first: {key}={value} is outside the searched {space}: "
                              f"search a space that holds it, or set hydra.sweeper.baseline_first=false")
        values[key] = value
    return values
