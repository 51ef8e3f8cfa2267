"""Which way is better for every metric the platform logs: the one table that the comparison report, the
studies and the summaries read, so that no panel or table can call caption adherence "lower is better".

A logged name is ``<split>/<quantity>[_<sampler or level>]`` (``val/caption_acc_euler25_cfg1p5``,
``test/fd_ratio_dopri5``, ``val/loss_t0.125``). Its direction is that of the longest quantity in the table
that the name (less its split) equals or starts with followed by ``_``: ``caption_acc_syn_euler25`` is a
``caption_acc_syn``, ``fd_ratio_euler25`` an ``fd_ratio``, ``fd_real`` (the real-vs-real floor, a property
of the data) has none. A metric not in the table has no direction: it is shown without one.
"""

from __future__ import annotations

HIGHER, LOWER = "higher", "lower"

DIRECTIONS: dict[str, str | None] = {
    # training objectives and their per-level / per-bucket / per-guidance parts
    "loss": LOWER,
    # sample quality (flowmatch.callbacks.image_metrics, point_metrics)
    "fd": LOWER, "fd_ratio": LOWER, "fid": LOWER, "w2": LOWER, "sw2": LOWER, "mmd": LOWER,
    "fd_real": None,  # the real-vs-real floor: a property of the data, not of the model
    "caption_acc": HIGHER, "caption_acc_syn": HIGHER, "placement_acc": HIGHER,
    "caption_acc_syn_real": None,  # the judge on real pictures: the ceiling, not the model
    # the GenEval-style score on the procedural scenes (flowmatch.callbacks.scene_eval): geneval_<sampler>,
    # geneval_<category>_<sampler>; geneval_real[_<category>] is the ceiling (renders through the latent space)
    "geneval": HIGHER, "geneval_real": None,
    # cost: fewer network evaluations per sample for the same quality is better
    "nfe": LOWER,
    # rectified flow's straightness (flowmatch.callbacks.straightness): 0 / 1 for straight paths
    "straightness": LOWER, "straightness_normalized": LOWER, "path_length_ratio": LOWER, "path_curvature": LOWER,
    # the platform's autoencoders and the digit classifier (the evaluation's feature network)
    "psnr": HIGHER, "acc": HIGHER,
    # diagnostics, neither better nor worse
    "attn_logit_max": None, "diverged_at_step": None, "epoch": None,
}

SPLITS = ("train/", "val/", "test/", "data/")


def quantity(metric: str) -> str | None:
    """The table's quantity a logged metric name measures (None when the table has none)."""
    name = metric.split("/", 1)[1] if metric.startswith(SPLITS) else metric
    best = None
    for q in DIRECTIONS:
        if (name == q or name.startswith(q + "_")) and (best is None or len(q) > len(best)):
            best = q
    return best


def direction(metric: str) -> str | None:
    """"higher" or "lower" (is better) for a logged metric name, None when neither is."""
    q = quantity(metric)
    return DIRECTIONS[q] if q is not None else None


def higher_is_better(metric: str) -> bool:
    return direction(metric) == HIGHER


def arrow(metric: str) -> str:
    """↑ (higher is better), ↓ (lower is better) or "" for a metric without a direction."""
    return {HIGHER: "↑", LOWER: "↓"}.get(direction(metric), "")


def phrase(metric: str) -> str:
    """ "higher is better" / "lower is better" / "" for titles and captions."""
    d = direction(metric)
    return f"{d} is better" if d else ""


def declared_direction(metric: str, higher: bool | None, where: str) -> bool:
    """A study column's or claim's direction: the table's, which a config may repeat but not contradict; a
    metric the table does not know takes the config's ``higher`` (default: lower is better)."""
    d = direction(metric)
    if d is None:
        return bool(higher)
    if higher is not None and bool(higher) != (d == HIGHER):
        raise ValueError(f"{where}: higher: {str(bool(higher)).lower()} contradicts the platform's direction for {metric!r} "
                         f"({d} is better, flowmatch.metrics.directions); drop the key")
    return d == HIGHER
