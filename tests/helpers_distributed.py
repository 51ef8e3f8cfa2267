"""Test helper: every rank writes the keys of the training samples it used (DIRPATH/keys_rank<R>.json)."""

import json
from pathlib import Path

import lightning


class RecordKeys(lightning.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += list(batch["key"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"keys_rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))
