"""The one place that touches Lightning's private API, where Lightning has no public hook for it.

Checked against Lightning 2.6.x (2.6.6). When Lightning changes, only this file should need to follow.
"""

from __future__ import annotations


def built_from_config() -> bool:
    """True while LightningCLI (or a test standing in for it) instantiates a module from its config.

    Lightning then hands ``save_hyperparameters`` the config itself (class_path / init_args), which lets
    ``load_from_checkpoint`` and flowmatch's ``load_objective`` rebuild network and time sampler. There is
    no public way to ask for it: it is the context variable ``_given_hyperparameters``."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get() is not None
