"""The one place that touches Lightning's private API, where Lightning has no public hook for it.

Checked against Lightning 2.6.x (2.6.6). When Lightning changes, only this file should need to follow
(tests/test_resume_extend.py checks what it relies on).
"""

from __future__ import annotations


def built_from_config() -> bool:
    """True while LightningCLI (or a test standing in for it) instantiates a module from its config.

    Lightning then hands ``save_hyperparameters`` the config itself (class_path / init_args), which lets
    ``load_from_checkpoint`` and flowmatch's ``load_objective`` rebuild network and time sampler. There is
    no public way to ask for it: it is the context variable ``_given_hyperparameters``."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get() is not None


def training_position(trainer) -> tuple[int, int]:
    """(epoch, batches of it consumed): where a fit resumed from a checkpoint written now must go on.

    Right in every place a checkpoint is written: mid-epoch, at a validation, at the end of an epoch, and
    at the end of a fit stopped by ``max_steps`` inside an epoch. In that last case Lightning runs the
    epoch-end hooks and counts the epoch as completed, though its batches are not all used: the position
    is still inside that epoch. An exhausted epoch gives (next epoch, 0)."""
    epoch_progress = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    epoch = max(epoch_progress.started - 1, 0)  # the epoch in progress, or the one whose end hooks run
    if batches.is_last_batch:
        return epoch + 1, 0
    return epoch, int(batches.current.processed)


def record_epoch_end_for_resume(trainer, checkpoint: dict) -> None:
    """Write a checkpoint taken in or after the epoch-end hooks in a loop state that Lightning resumes exactly.

    At the end of a fit (and of an epoch), Lightning counts the epoch as processed and completed, also when
    ``max_steps`` stopped it with batches left. A fit extended from such a checkpoint (``--ckpt_path last.ckpt``
    with a larger ``max_steps``) then started the next epoch (other data than the uninterrupted fit, one epoch
    more on the counter) or, at a real epoch end, lost its place in it. So the saved loop state is rewritten:

    * an epoch with batches left: as ``on_train_batch_end`` of its last step leaves it (the state of every
      ``every_n_train_steps`` checkpoint): epoch started but not processed, last batch processed, not completed;
    * an epoch used up: as at the start of the next epoch (Lightning's RESTARTED_ON_EPOCH_START).

    The layout is Lightning 2.6's."""
    current = trainer.fit_loop.epoch_progress.current
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if loop is None or current.started < 1 or current.processed < current.started:
        return  # written inside the epoch: Lightning's own state is right
    batches = loop["epoch_loop.batch_progress"]
    if batches["is_last_batch"]:
        # the epoch was used up: written as at the start of the next epoch (Lightning's RESTARTED_ON_EPOCH_START).
        # Not as after its last step: restored from that state, Lightning 2.6 goes on without starting the next
        # epoch (the same data, but one epoch less on the counter from then on, and no on_train_epoch_start)
        for part in ("total", "current"):
            epochs, done = loop["epoch_progress"][part], loop["epoch_progress"][part]["started"]
            epochs.update(ready=done + 1, started=done, processed=done, completed=done)
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False
        checkpoint["epoch"] = current.started
        return
    for part in ("total", "current"):
        epochs = loop["epoch_progress"][part]
        epochs["processed"] = epochs["completed"] = epochs["started"] - 1
    if all(batches[part]["completed"] == batches[part]["processed"] > 0 for part in ("total", "current")):  # (after the step)
        for part in ("total", "current"):
            batches[part]["completed"] -= 1
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1  # counted again when the loop restarts
    checkpoint["epoch"] = current.started - 1


def save_last_at_the_end(trainer) -> None:
    """Write last.ckpt (and the step file) at the end of a fit when no checkpoint holds the final step yet.

    ``ModelCheckpoint(save_last=True)`` saves at validations (and at epoch ends when validation runs once an
    epoch), and at the end of a fit only if it never saved: the steps after the last validation were missing
    from a finished run's last.ckpt. Its own saving methods are used, so names, top-k and links stay its own."""
    for callback in trainer.checkpoint_callbacks:
        if not callback.save_last or callback._should_skip_saving_checkpoint(trainer):
            continue  # (it skips when it already saved this step, in sanity checks, fast_dev_run and outside fit)
        candidates = callback._monitor_candidates(trainer)
        callback._save_topk_checkpoint(trainer, candidates)
        callback._save_last_checkpoint(trainer, candidates)
