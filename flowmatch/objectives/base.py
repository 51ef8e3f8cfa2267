"""The shared LightningModule: one training loop, SD3's validation loss, and generation for every objective.

An objective is a (path, parametrisation) pair plus a time sampler and a loss weighting; the
subclasses in this package only choose those pieces. The network is any plain nn.Module called
as ``net(z, t, cond)`` (see flowmatch.networks). Given as a module it is used as is; given as a
factory (what the CLI passes for a ``network: {class_path, init_args}`` config) it is built in
``configure_model``, so that DeepSpeed ZeRO-3 shards its parameters as they are created.

Runs resume exactly: the checkpoint carries every rank's RNG states (restored just before the first
resumed training step), and validation leaves the training RNG stream untouched.
"""

import math
from typing import Any, Callable

import lightning as L
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
import torch
from torch import nn
from torchmetrics import MeanMetric

from flowmatch.parametrisation import Parametrisation
from flowmatch.paths.base import AffinePath, expand_like
from flowmatch.sampling import SamplerConfig, guided_velocity, sample
from flowmatch.time_samplers import TimeSampler, UniformTime
from flowmatch.weighting import Weighting, get_weighting


class NonFiniteLossError(RuntimeError):
    """Raised (before any weight update) when the training loss is NaN or infinite."""


DIVERGED_METRIC = "train/diverged_at_step"  # logged once, just before NonFiniteLossError stops the run


class FlowObjective(L.LightningModule):
    """Base class of all objectives. Subclasses set ``self.path`` and ``self.parametrisation``.

    Args:
        network: the velocity / noise network, called as ``network(z, t, cond)``; or a factory
            ``() -> nn.Module`` that ``configure_model`` calls (the CLI passes one), so that a
            sharding strategy (DeepSpeed ZeRO-3) can build it sharded. ``self.net`` builds it on
            first use if nothing has yet.
        time_sampler: density of training times t (uniform, logit-normal, mode, cosmap).
        weighting: loss weighting w_t by name ("native" = plain MSE of the prediction; "eps",
            "velocity", "rf", "v": see flowmatch.weighting).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0 = none).
        sample_shape: shape of one data sample, e.g. [2] or [16, 8, 8]; linked from the data module.
        val_levels: number of equally spaced validation times t = k / val_levels, k = 1..val_levels
            (SD3 §5.3.3 uses 8); val/loss averages all but t = 1.
        val_seed: seed of the fixed validation noise.
        init_weights: a checkpoint (from `fit` or `import-sd3`) whose network weights start this run,
            e.g. to fine-tune an imported SD3 model; optimizer state is not taken from it.
    """

    path: AffinePath
    parametrisation: Parametrisation

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        time_sampler: TimeSampler | None = None,
        weighting: str = "native",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        sample_shape: list[int] | None = None,
        val_levels: int = 8,
        val_seed: int = 0,
        init_weights: str | None = None,
    ):
        super().__init__()
        # Built by the CLI, the hyper-parameters are the config itself (class_path / init_args), which
        # lets load_from_checkpoint rebuild network and sampler; built in Python, they are objects.
        from_config = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if from_config else ["network", "time_sampler"])
        self._network_factory: Callable[[], nn.Module] | None = None
        if isinstance(network, nn.Module):
            self.net = network
        elif callable(network):
            self._network_factory = network  # built in configure_model
        else:
            raise TypeError(f"network must be an nn.Module or a factory returning one, got {type(network).__name__}")
        self._rng_to_restore: dict | None = None  # set by on_load_checkpoint, used at the first resumed step
        self._rng_before_eval: dict | None = None
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.weighting: Weighting = get_weighting(weighting)
        if val_levels < 2:
            raise ValueError(f"val_levels must be >= 2 (t = 1 is excluded from the average), got {val_levels}")
        self.val_times = [k / val_levels for k in range(1, val_levels + 1)]
        self.val_metrics = nn.ModuleList(MeanMetric() for _ in self.val_times)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        if init_weights and self._network_factory is None:
            self._load_network_weights(init_weights)

    # --- the network: given, or built lazily ------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The network; built from its factory on first use if ``configure_model`` has not run yet."""
        net = self._modules.get("net")
        if net is None:
            self.configure_model()
            net = self._modules["net"]
        return net

    @property
    def network_built(self) -> bool:
        return self._modules.get("net") is not None

    def configure_model(self) -> None:
        """Build the network from its factory (once). Lightning calls this inside the strategy's
        sharding context (DeepSpeed ZeRO-3: ``deepspeed.zero.Init``); a module given directly is kept."""
        if self.network_built or self._network_factory is None:
            return
        network = self._network_factory()
        if not isinstance(network, nn.Module):
            raise TypeError(f"the network factory returned {type(network).__name__}, not an nn.Module")
        self.net = network
        if self.hparams.get("init_weights"):
            self._load_network_weights(self.hparams.init_weights)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.configure_model()  # a lazily built network must exist before its weights can be loaded
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_network_weights(self, path: str) -> None:
        """Copy the network weights of another checkpoint into this one's network (shapes must match)."""
        from flowmatch.checkpoints import CheckpointError, read_weights
        from flowmatch.strategies.zero3 import gathered

        state = read_weights(path)["state_dict"]
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        net = self._modules["net"]
        with gathered(net.parameters(), modifier_rank=0):  # ZeRO-3: load into the full tensors, re-shard after
            missing, unexpected = net.load_state_dict(net_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"init_weights {path} does not fit this network: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    # --- the objective ---------------------------------------------------------------------
    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.net(z, t, cond)

    def loss_per_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The weighted regression loss of each sample, computed in float32."""
        s = self.path.sample(x0.float(), eps.float(), t.float())
        out = self.net(s.z.to(x0.dtype), t, cond).float()
        mse = (out - self.parametrisation.target(s, self.path)).pow(2).flatten(1).mean(1)
        multiplier = self.weighting.multiplier(t.float(), self.path, self.parametrisation)
        return mse if multiplier is None else mse * multiplier

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """dz/dt of the learned flow: the network output converted by the parametrisation."""
        out = self.net(z, t, cond)
        return self.parametrisation.to_velocity(out.float(), z.float(), t.float(), self.path)

    # --- training ------------------------------------------------------------------------------
    def _unpack(self, batch) -> tuple[torch.Tensor, Any]:
        if isinstance(batch, dict):
            if "x0" not in batch:
                raise KeyError(f"a batch must be a dict with key 'x0' (and optionally 'cond'); got keys {sorted(batch)}")
            return batch["x0"], batch.get("cond")
        if isinstance(batch, torch.Tensor):
            return batch, None
        raise TypeError(f"a batch must be a dict {{'x0': ..., 'cond': ...}} or a tensor, got {type(batch).__name__}")

    def training_step(self, batch, batch_idx):
        x0, cond = self._unpack(batch)
        if self.sample_shape is None:  # remember what we generate, for checkpoints made without a linked data module
            self.sample_shape = tuple(x0.shape[1:])
        # times and noise are drawn in float32, even when the batch arrives in bf16
        t = self.time_sampler.sample(x0.shape[0], device=x0.device)
        if isinstance(batch, dict) and "eps" in batch:  # fixed (noise, data) couplings, e.g. for reflow
            eps = batch["eps"].float()
        else:
            eps = torch.randn(x0.shape, device=x0.device, dtype=torch.float32)
        loss = self.loss_per_sample(x0, t, eps, cond).mean()
        self._check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        bad = not bool(torch.isfinite(loss))
        trainer = self._trainer  # None outside a Trainer (self.trainer would raise)
        if trainer is not None and trainer.world_size > 1:  # every rank stops together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            ckpt = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
            last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
            kept = f" The last good checkpoint is kept: {last}." if last else " No checkpoint had been written yet."
            if trainer is not None and getattr(trainer, "is_global_zero", False):  # the run's record says it diverged, and when (studies count it)
                for logger in trainer.loggers:
                    logger.log_metrics({DIVERGED_METRIC: float(self.global_step)}, step=self.global_step)
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} (batch {batch_idx}); "
                f"stopping before the update so no NaN weights are written.{kept} Lower the learning rate "
                f"(lr={self.hparams.lr}), enable gradient clipping (trainer.gradient_clip_val), or check the data."
            )

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)  # no decay on biases, norms, embeddings' scales
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        warmup = self.hparams.warmup_steps
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- SD3 validation loss: fixed t levels, fixed noise ----------------------------------------
    def _level_losses(self, batch, batch_idx: int, stage: str) -> None:
        x0, cond = self._unpack(batch)
        if isinstance(batch, dict) and "eps" in batch:  # couplings: the loss of the fixed pairs (reflow)
            eps = batch["eps"].float()
        else:
            gen = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device)
        for t_level, metric in zip(self.val_times, self.val_metrics):
            t = torch.full((x0.shape[0],), t_level, device=x0.device, dtype=torch.float32)
            metric.update(self.loss_per_sample(x0, t, eps, cond))

    def _log_level_losses(self, stage: str) -> None:
        values = [m.compute() for m in self.val_metrics]
        for t_level, v in zip(self.val_times, values):
            self.log(f"{stage}/loss_t{t_level:.3f}", v, sync_dist=True)  # (already reduced over ranks by the metric)
        self.log(f"{stage}/loss", torch.stack(values[:-1]).mean(), prog_bar=True, sync_dist=True)  # t = 1 excluded (SD3)
        for m in self.val_metrics:
            m.reset()

    def validation_step(self, batch, batch_idx):
        self._level_losses(batch, batch_idx, "val")

    def on_validation_epoch_end(self):
        self._log_level_losses("val")

    def test_step(self, batch, batch_idx):
        self._level_losses(batch, batch_idx, "test")

    def on_test_epoch_end(self):
        self._log_level_losses("test")

    # --- generation ------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """`predict`: one generated sample per item of the batch, conditioned on the batch's condition.

        Uses the Euler sampler with 25 steps; the noise is seeded by the batch index, so predictions repeat.
        """
        x0, cond = self._unpack(batch)
        x, _ = self.generate(x0.shape[0], SamplerConfig(solver="euler", steps=25), cond=cond, seed=batch_idx)
        return x

    def null_condition(self, cond: Any) -> Any:
        """The unconditional counterpart of ``cond`` for classifier-free guidance (None if the network has none)."""
        if cond is None or not hasattr(self.net, "null_condition"):
            return None
        return self.net.null_condition(cond)

    @torch.no_grad()
    def generate(
        self,
        num: int,
        sampler: SamplerConfig | None = None,
        cond: Any = None,
        seed: int | None = 0,
        noise: torch.Tensor | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, int]:
        """Draw ``num`` samples by integrating the probability-flow ODE from t = t_max to 0.

        Returns (samples, nfe). The network runs in eval mode (no condition dropout).
        """
        sampler = sampler or SamplerConfig()
        if noise is None:
            if self.sample_shape is None:
                raise RuntimeError("this model does not know its sample shape: train it first or pass noise")
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            noise = torch.randn((num, *self.sample_shape), generator=gen, dtype=torch.float32)
        noise = noise.to(self.device)
        uncond = self.null_condition(cond) if sampler.guidance != 1.0 else None
        was_training = self.net.training
        self.net.eval()
        try:
            t_min = self.path.t_min
            x, nfe = sample(self.velocity, noise, cond=cond, uncond=uncond, config=sampler, t_max=self.path.t_max, t_min=t_min, progress=progress)
            if t_min > 0:  # the velocity is singular at t = 0: finish with the model's x0 prediction
                t = torch.full((x.shape[0],), t_min, device=x.device, dtype=x.dtype)
                v = guided_velocity(self.velocity, cond, uncond, sampler.guidance)(x, t)
                x, nfe = self.path.x0_eps_from_velocity(v, x, t)[0], nfe + 1
            return x, nfe
        finally:
            self.net.train(was_training)

    # --- RNG: one stream per rank, exact across resume, untouched by evaluation ------------------------
    def on_train_start(self) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and self._rng_to_restore is None:
            # every rank draws its own times and noise (seed_everything gives all ranks the same seed)
            torch.manual_seed(torch.initial_seed() + 1_000_003 * trainer.global_rank)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:  # first step after a resume: continue the saved RNG streams
            from flowmatch.checkpoints import restore_rng_state

            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def _save_rng(self) -> None:
        from flowmatch.checkpoints import capture_rng_state

        self._rng_before_eval = capture_rng_state()

    def _restore_rng(self) -> None:
        from flowmatch.checkpoints import restore_rng_state

        if self._rng_before_eval is not None:
            restore_rng_state(self._rng_before_eval)
            self._rng_before_eval = None

    def on_validation_start(self) -> None:
        self._save_rng()  # validation (and the sample metrics in it) must not shift the training stream

    def on_validation_end(self) -> None:
        self._restore_rng()

    def _check_checkpoint_fits(self, checkpoint: dict) -> None:
        """Refuse, before any weight is loaded, a checkpoint of another objective or another network (CheckpointError)."""
        from flowmatch.checkpoints import CheckpointError

        saved = (checkpoint.get("flowmatch") or {}).get("objective")
        if saved is not None and saved != type(self).__name__:
            raise CheckpointError(f"the checkpoint was trained with the objective {saved}, but this run's model is "
                                  f"{type(self).__name__}: use the config it was trained with (or init_weights to start from its network)")
        state = checkpoint.get("state_dict")
        if not state:
            return  # DeepSpeed checkpoints keep the weights in their own shard files
        self.configure_model()
        if any(hasattr(p, "ds_numel") for p in self.parameters()):
            return  # ZeRO-3 partitioned parameters: DeepSpeed checks the shapes itself
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            parts = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}" for label, items in
                     (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", wrong)) if items]
            raise CheckpointError(f"the checkpoint's network does not fit this run's {type(self.net).__name__}: " + "; ".join(parts) +
                                  ". Use the config (network sizes) the checkpoint was trained with.")

    # --- checkpoints remember what is generated (and from which data), and the RNG -------------------------
    #: facts about the latent/caption data the model was trained on (text encoders, autoencoder, latent
    #: normalisation, manifest; see flowmatch.data.latent_info), so `sample` can turn prompts into images
    #: without the data config; None for other data and for checkpoints written before they were stored
    data_info: dict | None = None

    def _data_info_to_save(self) -> dict | None:
        from flowmatch.data.latent_info import info_from_datamodule

        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        try:
            info = info_from_datamodule(datamodule) if datamodule is not None else None
        except Exception as err:  # a checkpoint must never fail over this: keep what was known
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"the checkpoint does not record its data (text encoders, autoencoder): {type(err).__name__}: {err}")
            info = None
        return info if info is not None else self.data_info  # a run without a shard data module keeps what it loaded

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from flowmatch.checkpoints import gather_rng_states

        checkpoint["flowmatch"] = {"sample_shape": list(self.sample_shape) if self.sample_shape else None, "objective": type(self).__name__}
        data = self._data_info_to_save()
        if data is not None:
            checkpoint["flowmatch"]["data"] = data
        trainer = self._trainer
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if trainer is not None and getattr(fn, "value", fn) == "fit":
            # inside validation (a checkpoint saved at validation end) the training stream is the one
            # saved when validation started, to which on_validation_end returns
            checkpoint["rng_states"] = gather_rng_states(trainer, self._rng_before_eval)  # one entry per rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_checkpoint_fits(checkpoint)
        shape = checkpoint.get("flowmatch", {}).get("sample_shape")
        if shape is not None:
            self.sample_shape = tuple(shape)
        data = checkpoint.get("flowmatch", {}).get("data")
        if isinstance(data, dict):  # absent in older checkpoints and for non-latent data
            self.data_info = data
        states = checkpoint.get("rng_states")
        trainer = self._trainer
        if states and trainer is not None:
            if len(states) == trainer.world_size:
                self._rng_to_restore = states[trainer.global_rank]
            else:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"the checkpoint holds RNG states of {len(states)} ranks, this run has {trainer.world_size}: "
                               "the random stream restarts from the seed (the run continues, not bit-exactly)")
