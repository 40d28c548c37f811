"""The tuning sweeper as a Hydra plugin (Hydra instantiates sweepers from the ``hydra_plugins`` namespace
only; trainer/__init__.py puts this folder on the path). The work is in trainer/sweep.py."""

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class TuningSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's sweeper running :class:`trainer.sweep.TuningSweep`."""

    def __init__(self, sampler, direction, storage, study_name, n_trials, n_jobs, search_space,
                 custom_search_space, params) -> None:
        from trainer.sweep import TuningSweep  # imported when a sweep starts, not when Hydra scans plugins

        self.sweeper = TuningSweep(sampler, direction, storage, study_name, n_trials, n_jobs, search_space,
                                   custom_search_space, params)
