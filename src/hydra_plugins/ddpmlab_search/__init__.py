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

Hydra instantiates sweepers only from the hydra_plugins namespace, hence this package's place.
"""

from pathlib import Path

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # no `search` extra: Hydra imports every plugin on each start, and would warn each time
    OptunaSweeper = object  # a plain class, which Hydra does not take for a plugin


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's OptunaSweeper, started where its stored study left off (module docstring)."""

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        search = self.sweeper
        if search.storage is None or search.study_name is None:
            return
        import optuna  # only once a search starts: Hydra imports every plugin on every start

        try:
            study = optuna.load_study(study_name=search.study_name, storage=search.storage)
        except KeyError:  # no such study yet: a first start
            return
        trials = study.get_trials(deepcopy=False)
        killed = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        for number in killed:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        search.n_trials = max(search.n_trials - (len(trials) - len(killed)), 0)
        search.job_idx = len(trials)
        if hasattr(search.sampler, "reseed_rng"):  # a fixed seed would replay the first start's random trials
            search.sampler.reseed_rng()
