"""What a checkpoint remembers of the model beyond its weights: ``checkpoint["flowmatch"]``.

    {"sample_shape": [C, H, W] or [D] or None,   what the model generates
     "objective": "RectifiedFlow",                 its objective class (checked when the checkpoint is loaded)
     "data": {...}}                                the latent/caption data it was trained on (absent for other data)

``data`` comes from ``flowmatch.data.latent_info.info_from_datamodule`` (text encoders, autoencoder, latent
normalisation, manifest), so ``sample`` can turn prompts into images without the data config.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

RECORD_KEY = "flowmatch"


def data_info_of_run(trainer, fallback: dict | None) -> dict | None:
    """The data record of the trainer's data module, or ``fallback`` (what the model loaded) when it has none."""
    from flowmatch.data.latent_info import info_from_datamodule  # the data package is only needed when saving

    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    try:
        info = info_from_datamodule(datamodule) if datamodule is not None else None
    except Exception as err:  # a checkpoint must never fail over this: keep what was known
        rank_zero_warn(f"the checkpoint does not record its data (text encoders, autoencoder): {type(err).__name__}: {err}")
        info = None
    return info if info is not None else fallback  # a run without a shard data module keeps what it loaded


def write_record(checkpoint: dict[str, Any], sample_shape, objective: str, data: dict | None) -> None:
    checkpoint[RECORD_KEY] = {"sample_shape": list(sample_shape) if sample_shape else None, "objective": objective}
    if data is not None:
        checkpoint[RECORD_KEY]["data"] = data


def read_record(checkpoint: dict[str, Any]) -> tuple[tuple[int, ...] | None, dict | None]:
    """(sample_shape, data) of a checkpoint; None for what it does not hold (older checkpoints, non-latent data)."""
    record = checkpoint.get(RECORD_KEY) or {}
    shape = record.get("sample_shape")
    data = record.get("data")
    return (tuple(shape) if shape is not None else None), (data if isinstance(data, dict) else None)


def saved_objective(checkpoint: dict[str, Any]) -> str | None:
    return (checkpoint.get(RECORD_KEY) or {}).get("objective")
