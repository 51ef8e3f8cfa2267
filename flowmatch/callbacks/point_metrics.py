"""Sample quality of low-dimensional (e.g. 2-D) models: W2, sliced W2 and MMD to held-out points, per sampler."""

import lightning as L

from flowmatch.callbacks.common import generate, parse_samplers, reference_batch
from flowmatch.callbacks.plots import scatter_figure
from flowmatch.metrics import mmd_rbf, sliced_wasserstein2, wasserstein2_exact
from flowmatch.tracking import log_image_to_loggers


class PointSampleMetrics(L.Callback):
    """At the end of each validation / test epoch, sample with each sampler and compare to held-out data.

    Logs ``{stage}/w2_{sampler}`` (exact 2-Wasserstein), ``{stage}/sw2_{sampler}`` (sliced),
    ``{stage}/mmd_{sampler}`` (squared RBF MMD) and ``{stage}/nfe_{sampler}``, e.g. ``val/w2_euler8``,
    and (``plot``) an image ``samples`` / ``test_samples``: one scatter panel per sampler beside the data.

    Args:
        samplers: sampler specs: SOLVER[STEPS][:cfg=W][:shift=A][:grid=sd3], e.g. "euler1", "heun4", "dopri5", "euler8:cfg=2".
        num_samples: generated and held-out points per metric (exact W2 is cubic in this).
        seed: seed of the sampling noise (fixed, so numbers and pictures are comparable across steps).
        plot: also log the scatter picture.
    """

    def __init__(self, samplers: list[str] = ["euler1", "euler8", "dopri5"], num_samples: int = 1000, seed: int = 1234, plot: bool = True):
        self.samplers = parse_samplers(samplers)
        self.num_samples, self.seed, self.plot = num_samples, seed, plot
        self.last: dict[str, float] = {}  # the latest numbers, for tests and the CLI's summary

    def _evaluate(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        ref, labels = reference_batch(trainer, self.num_samples, stage)
        panels = [("data (held out)", ref.numpy())]
        for sampler in self.samplers:
            x, nfe = generate(pl_module, self.num_samples, sampler, labels, self.seed)
            name = sampler.name
            values = {
                f"{stage}/w2_{name}": wasserstein2_exact(x, ref),
                f"{stage}/sw2_{name}": sliced_wasserstein2(x, ref),
                f"{stage}/mmd_{name}": mmd_rbf(x, ref),
                f"{stage}/nfe_{name}": float(nfe),
            }
            for key, value in values.items():
                pl_module.log(key, value)
            self.last.update(values)
            panels.append((f"{name}: W2 {values[f'{stage}/w2_{name}']:.3f}, NFE {nfe}", x.numpy()))
        if self.plot:
            key = "samples" if stage == "val" else f"{stage}_samples"
            log_image_to_loggers(trainer, scatter_figure(panels), key=key, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "test")
