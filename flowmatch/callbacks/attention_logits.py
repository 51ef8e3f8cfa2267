"""Log the largest attention logit of the network during training: ``train/attn_logit_max``.

Every ``every_n_steps`` training steps the forward pass of that step runs inside an
``AttentionLogitRecorder`` (flowmatch.networks.attention_probe) and the largest |q·k| / sqrt(head_dim)
over all layers, heads and tokens is logged. Its growth is the failure that QK-normalisation prevents
(SD3 §5.3.2; Wortsman et al. 2023): the QK-norm study (experiments/studies/qk_norm_bf16.yaml) plots it.
"""

from __future__ import annotations

import lightning as L

from flowmatch.networks.attention_probe import AttentionLogitRecorder


class AttentionLogitMonitor(L.Callback):
    def __init__(self, every_n_steps: int = 25):
        """Args:
            every_n_steps: record and log the largest attention logit on every N-th training step (1 = every step).
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._recorder: AttentionLogitRecorder | None = None
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self._step = trainer.global_step
            self._recorder = AttentionLogitRecorder().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec, self._recorder = self._recorder, None
        if rec is None:
            return
        rec.__exit__(None, None, None)
        # straight to the loggers at the step it was measured: self.log would repeat the value on the steps between
        if rec.max_logit is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"train/attn_logit_max": rec.max_logit}, step=self._step)

    def on_exception(self, trainer, pl_module, exception):
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None
