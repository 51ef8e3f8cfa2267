"""The model learns what it generates from the data, and is checked against it, before the first step.

:class:`MatchModelToData` (the CLI adds it to every run):

* at ``setup`` (after the data module's, before the model's): a model that does not know its sample shape
  takes the data's (``datamodule.sample_shape``; for latent shards read from the manifest, which may
  only exist once ``prepare_data`` has written it); the shape is also recorded in the model's
  hyper-parameters, so checkpoints keep it as before. A model that does know it must agree.
* at the start of fit / validate / test / predict (the network is built by then, in ``configure_model``):
  a data module with latent-data facts is checked against the network with
  :func:`flowmatch.networks.conditioning.check_fits` (channels, patch size, text widths and lengths);
  a mismatch raises ManifestMismatchError naming the manifest and every problem.
"""

from __future__ import annotations

import lightning

from flowmatch.data.facts import facts_of
from flowmatch.data.shard_format import ManifestMismatchError
from flowmatch.networks.conditioning import ConditioningMismatchError, check_fits


def data_sample_shape(datamodule) -> tuple[int, ...] | None:
    """The shape of one sample of the data module's data (None when it does not say)."""
    shape = getattr(datamodule, "sample_shape", None) if datamodule is not None else None
    return tuple(int(s) for s in shape) if shape is not None else None


class MatchModelToData(lightning.Callback):
    """Gives the model the data's sample shape at setup, and checks the network against the data at the start."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        shape = data_sample_shape(datamodule)
        if shape is None:
            return
        have = getattr(pl_module, "sample_shape", None)
        if have is None and isinstance(pl_module.hparams.get("sample_shape"), (list, tuple)):
            have = pl_module.hparams["sample_shape"]
        if have is not None and tuple(int(s) for s in have) != shape:
            facts = facts_of(datamodule)
            where = f"shard set {facts.location}" if facts is not None else f"the data ({type(datamodule).__name__})"
            raise ManifestMismatchError(f"{where} does not fit the model: the model generates samples of shape {tuple(have)} "
                                        f"but the data holds samples of shape {shape}")
        if hasattr(pl_module, "sample_shape") and pl_module.sample_shape is None:
            pl_module.sample_shape = shape
        if "sample_shape" in pl_module.hparams and pl_module.hparams["sample_shape"] is None:
            pl_module.hparams["sample_shape"] = datamodule.sample_shape  # as written in the data, as the config link did

    def _check(self, trainer, pl_module) -> None:
        facts = facts_of(trainer.datamodule)
        network = getattr(pl_module, "net", None)
        if facts is None or network is None:
            return
        where = f"shard set {facts.location}"
        try:
            check_fits(network, facts.conditioning, facts.sample_shape, data_name=where)
            for shape in facts.sample_shapes:  # every aspect-ratio bucket must fit as well
                check_fits(network, None, shape, data_name=where)
        except ConditioningMismatchError as err:
            raise ManifestMismatchError(str(err)) from None
        table = getattr(getattr(network, "pos_embed", None), "max_size", None)
        too_big = [s for s in facts.sample_shapes if table and max(s[1:]) > table * network.patch_size]
        if too_big:
            raise ManifestMismatchError(
                f"{where} holds latents of {too_big[0][1]}x{too_big[0][2]}, beyond the network's position table of "
                f"{table}x{table} tokens = {table * network.patch_size}x{table * network.patch_size} latent pixels "
                f"(set by {getattr(network, 'table_arg', 'its table size')}): raise it, or leave that bucket out")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":  # a fit was checked at its start
            self._check(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)
