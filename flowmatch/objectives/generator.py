"""The LightningModule base of everything that trains a network and generates with it.

``FlowGenerator`` holds what FlowObjective (flowmatch.objectives.base) and the few-step distillation
student (flowmatch.objectives.distillation) share, and nothing of how either computes its loss:

* the network: given as a module, or as a factory (what the CLI passes for a ``network:
  {class_path, init_args}`` config) built in ``configure_model``, so that DeepSpeed ZeRO-3 shards its
  parameters as they are created; ``init_weights`` starts it from another checkpoint's network;
* the optimizer (AdamW, no decay on biases and norms, optional linear warm-up);
* generation: the network's output read as a velocity on ``path`` (set by the subclass, with
  ``parametrisation``) and integrated from noise to data (``generate``, ``predict_step``);
* what a checkpoint remembers (flowmatch.training.checkpoint_record), the check that a checkpoint fits
  (flowmatch.training.checkpoint_checks) and exact resume (the ResumeRNG callback this module returns
  from ``configure_callbacks``).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from flowmatch.adapters.fine_tuning import FineTuning
from flowmatch.adapters.freezing import trainable_summary
from flowmatch.adapters.lora import LoraAdapter, as_adapter
from flowmatch.checkpoints.fingerprint import weights_fingerprint
from flowmatch.lightning_compat import built_from_config
from flowmatch.objectives.loss import VelocityField
from flowmatch.parametrisation import Parametrisation
from flowmatch.paths.base import AffinePath
from flowmatch.sampling import SamplerConfig, guided_velocity, sample
from flowmatch.sampling.guidance import embeds_guidance, network_passes
from flowmatch.training.checkpoint_checks import check_checkpoint_fits
from flowmatch.training.checkpoint_record import data_info_of_run, read_record, write_record
from flowmatch.training import lr_schedule
from flowmatch.training.finished_run import FinishedRunCheckpoint
from flowmatch.training.lost_peer import LostPeerReport
from flowmatch.training.resume_rng import ResumeRNG
from flowmatch.training.writable_checkpoints import WritableCheckpoints


def unpack_batch(batch) -> tuple[torch.Tensor, Any]:
    """(x0, cond) of a batch: a dict {"x0": ..., "cond": ...} or a plain tensor of samples."""
    if isinstance(batch, dict):
        if "x0" not in batch:
            raise KeyError(f"a batch must be a dict with key 'x0' (and optionally 'cond'); got keys {sorted(batch)}")
        return batch["x0"], batch.get("cond")
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"a batch must be a dict {{'x0': ..., 'cond': ...}} or a tensor, got {type(batch).__name__}")


class FlowGenerator(L.LightningModule):
    """A network trained by a subclass's loss, generating by integrating its velocity field (see this module's docstring).

    Subclasses set ``self.path`` and ``self.parametrisation`` and implement the steps. ``former_names``
    lists earlier class names whose checkpoints this class accepts (a renamed objective).

    Args:
        network: the network, called as ``network(z, t, cond)``; or a factory ``() -> nn.Module`` that
            ``configure_model`` calls (the CLI passes one). ``self.net`` builds it on first use if nothing has yet.
        lr, weight_decay, betas: AdamW's.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0 = none).
        lr_decay_steps: cosine decay of the learning rate from lr (after warm-up) to lr * lr_final_ratio at this
            optimizer step, constant after it; 0 = none, constant lr after warm-up (flowmatch.training.lr_schedule).
        lr_final_ratio: the learning rate at and after lr_decay_steps, as a fraction of lr.
        sample_shape: shape of one data sample, e.g. [2] or [16, 8, 8]; set from the data at setup (the CLI adds flowmatch.callbacks.data_match.MatchModelToData).
        init_weights: a checkpoint whose network weights start this run (its EMA weights when it has them, as
            `sample` and `export-diffusers` read it); optimizer state is not taken from it.
        adapter: fine-tune with a LoRA adapter (flowmatch.adapters.LoraAdapter: rank, alpha, target_modules,
            dropout, init): only the adapter (and ``trainable``) trains; the rest of the network is frozen.
        trainable: fine-tune only the parameters whose names match one of these regular expressions (e.g.
            ``final_layer\\..*``, ``.*adaLN_modulation.*``); with an adapter, these train beside it.
        frozen_dtype: hold the frozen parameters in this dtype ("bfloat16" halves the base's memory); the trained
            ones and their optimizer state stay float32. Fine-tuning runs only.

    In a fine-tuning run (adapter or trainable) whose base comes from ``init_weights``, checkpoints hold the
    trained parameters only (the adapter, not a second copy of the base); loading one reads the base from
    ``init_weights`` again and checks it is the same base (its fingerprint).
    """

    path: AffinePath
    parametrisation: Parametrisation
    former_names: tuple[str, ...] = ()

    #: facts about the latent/caption data the model was trained on (text encoders, autoencoder, latent
    #: normalisation, manifest; see flowmatch.data.latent_info), so `sample` can turn prompts into images
    #: without the data config; None for other data and for checkpoints written before they were stored
    data_info: dict | None = None

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_final_ratio: float = 0.1,
        sample_shape: list[int] | None = None,
        init_weights: str | None = None,
        adapter: LoraAdapter | None = None,
        trainable: list[str] | None = None,
        frozen_dtype: str | None = None,
    ):
        super().__init__()
        lr_schedule.check_schedule(warmup_steps, lr_decay_steps, lr_final_ratio)
        # Built by the CLI, the hyper-parameters are the config itself (class_path / init_args), which lets
        # load_from_checkpoint rebuild network and sampler; built in Python, they are the arguments of every
        # __init__ of the class chain, less the objects that cannot be saved.
        self.save_hyperparameters(ignore=[] if built_from_config() else ["network", "time_sampler", "time_shift"])
        self._network_factory: Callable[[], nn.Module] | None = None
        if isinstance(network, nn.Module):
            self.net = network
        elif callable(network):
            self._network_factory = network  # built in configure_model
        else:
            raise TypeError(f"network must be an nn.Module or a factory returning one, got {type(network).__name__}")
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.fine_tuning = FineTuning(as_adapter(adapter), list(trainable or []), frozen_dtype)
        self.stored_lora_layout = None  # set by load_objective: the adapter layout a checkpoint was trained with
        if self._network_factory is None:  # (a network from a factory is prepared in configure_model)
            self._prepare_network()

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
        self._prepare_network()

    def _prepare_network(self) -> None:
        """Start from ``init_weights``, then set up fine-tuning (adapter, frozen parameters and their dtype)."""
        base = None
        if self.hparams.get("init_weights"):
            base = self._load_network_weights(self.hparams.init_weights)
        self.fine_tuning.apply(self._modules["net"], base_fingerprint=base, layout=self.stored_lora_layout)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.configure_model()  # a lazily built network must exist before its weights can be loaded
        frozen = self._frozen_from_base()
        if not frozen:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        # a fine-tuning checkpoint holds the trained parameters only: the frozen ones came from init_weights
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if k not in frozen]
        if strict and (missing or unexpected):
            raise RuntimeError(f"the checkpoint does not fit this fine-tuning run: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def state_dict(self, *args, **kwargs):
        """The module's state; in a fine-tuning run from ``init_weights``, without the frozen base (read from there again)."""
        state = super().state_dict(*args, **kwargs)
        frozen = self._frozen_from_base()
        if frozen:
            prefix = kwargs.get("prefix", "")
            for key in [k for k in state if k[len(prefix):] in frozen]:
                del state[key]
        return state

    def _frozen_from_base(self) -> set[str]:
        """Names of the frozen parameters that ``init_weights`` provides (none outside a fine-tuning run from it)."""
        if not self.hparams.get("init_weights") or not self.network_built:
            return set()
        return {"net." + n for n in self.fine_tuning.frozen_names}

    def _load_network_weights(self, path: str) -> str:
        """Copy the network weights of another checkpoint into this one's network (shapes must match);
        returns the fingerprint of those weights."""
        from flowmatch.checkpoints import CheckpointError, read_weights, select_weights
        from flowmatch.strategies.zero3 import gathered

        ckpt = read_weights(path)
        if ckpt.get("frozen_base"):
            raise CheckpointError(f"init_weights {path} is a fine-tuning checkpoint (it holds only the trained part of its network): "
                                  "start from its base, or merge it first: python -m flowmatch export-lora ... --merge")
        state, _ = select_weights(ckpt, "auto", source=str(path))  # its EMA weights when it has them: the model it was judged by
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        net = self._modules["net"]
        with gathered(net.parameters(), modifier_rank=0):  # ZeRO-3: load into the full tensors, re-shard after
            missing, unexpected = net.load_state_dict(net_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"init_weights {path} does not fit this network: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return weights_fingerprint(net_state)

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.net(z, t, cond)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """dz/dt of the learned flow: the network output converted by the parametrisation."""
        return VelocityField(self.path, self.parametrisation).velocity(self.net, z, t, cond)

    def _remember_sample_shape(self, x0: torch.Tensor) -> None:
        if self.sample_shape is None:  # what we generate, for checkpoints made without a linked data module
            self.sample_shape = tuple(x0.shape[1:])

    # --- optimizer ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter is flat: its full shape is ds_shape
                (no_decay if ndim < 2 else decay).append(p)  # no decay on biases, norms, embeddings' scales
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups, which a scheduler would then miscount
        # the fused kernel: one pass over each tensor instead of ~10 (9.1M parameters: 7 ms a step against 20 on CPU)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for g in groups for p in g["params"])
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=fused or None)
        warmup, decay = self.hparams.warmup_steps, self.hparams.get("lr_decay_steps", 0)
        if warmup <= 0 and not decay:
            return opt
        sched = lr_schedule.scheduler(opt, warmup, decay, self.hparams.get("lr_final_ratio", 0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- generation ------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """`predict`: one generated sample per item of the batch, conditioned on the batch's condition.

        Uses the Euler sampler with 25 steps; the noise is seeded by the batch index, so predictions repeat.
        """
        x0, cond = unpack_batch(batch)
        x, _ = self.generate(x0.shape[0], SamplerConfig(solver="euler", steps=25), cond=cond, seed=batch_idx)
        return x

    def null_condition(self, cond: Any) -> Any:
        """The unconditional counterpart of ``cond`` for classifier-free guidance (None if the network takes no condition)."""
        if cond is None:
            return None
        spec = getattr(self.net, "conditioning", None)
        if spec is None:  # a network that declares no ConditioningSpec: it has a null condition if it says how to make one
            return self.net.null_condition(cond) if hasattr(self.net, "null_condition") else None
        return self.net.null_condition(cond) if spec.is_conditional else None

    @torch.no_grad()
    def generate(
        self,
        num: int,
        sampler: SamplerConfig | None = None,
        cond: Any = None,
        seed: int | None = 0,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        shape: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Draw ``num`` samples by integrating the probability-flow ODE from t = t_max to 0.

        ``shape`` is one sample's shape, e.g. (C, h, w) for another latent size than the training one
        (networks with a cropped position table or RoPE take any size within their limits); default
        ``self.sample_shape``. Ignored when ``noise`` is given. Returns (samples, nfe). The network runs
        in eval mode (no condition dropout).
        """
        sampler = sampler or SamplerConfig()
        if noise is None:
            shape = tuple(shape) if shape is not None else self.sample_shape
            if shape is None:
                raise RuntimeError("this model does not know its sample shape: train it first or pass noise (or shape)")
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            noise = torch.randn((num, *shape), generator=gen, dtype=torch.float32)
        noise = noise.to(self.device)
        # a guidance-distilled network takes the scale as an input and has no unconditional branch
        uncond = self.null_condition(cond) if sampler.guidance != 1.0 and not embeds_guidance(self.net) else None
        was_training = self.net.training
        self.net.eval()
        try:
            t_min = self.path.t_min
            x, nfe = sample(self.velocity, noise, cond=cond, uncond=uncond, config=sampler, t_max=self.path.t_max, t_min=t_min, progress=progress,
                            path=self.path)
            if t_min > 0:  # the velocity is singular at t = 0: finish with the model's x0 prediction
                t = torch.full((x.shape[0],), t_min, device=x.device, dtype=x.dtype)
                v = guided_velocity(self.velocity, cond, uncond, sampler.guidance)(x, t)
                x = self.path.x0_eps_from_velocity(v, x, t)[0]
                nfe += network_passes(self.velocity, cond, uncond, sampler.guidance)
            return x, nfe
        finally:
            self.net.train(was_training)

    # --- exact resume, what checkpoints remember, and the check that one fits ---------------------------------
    def configure_callbacks(self):
        return [ResumeRNG(), FinishedRunCheckpoint(), WritableCheckpoints(), LostPeerReport()]

    def on_fit_start(self) -> None:
        if self.fine_tuning.active:
            self.fine_tuning.check_precision(self.net, self.trainer.precision)
            if self.trainer.is_global_zero:
                print(f"fine-tuning {type(self.net).__name__}:\n{trainable_summary(self.net)}", flush=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        write_record(checkpoint, self.sample_shape, type(self).__name__, data_info_of_run(self._trainer, self.data_info))
        if self.network_built:
            self.fine_tuning.record(checkpoint, self.hparams.get("init_weights") if self._frozen_from_base() else None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_fits(self, checkpoint, accepted_objectives=(type(self).__name__, *self.former_names))
        if self.network_built:
            self.fine_tuning.check_checkpoint(checkpoint)
        shape, data = read_record(checkpoint)
        if shape is not None:
            self.sample_shape = shape
        if data is not None:  # absent in older checkpoints and for non-latent data
            self.data_info = data
