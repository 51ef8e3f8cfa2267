"""Entry point: dispatches the platform's own commands and hands the rest to LightningCLI."""

import importlib
import os
import sys

# every command: name -> (module with main(argv) -> exit code, or None for LightningCLI's own; one line of help)
COMMANDS = {
    "fit": (None, "train a model: --config experiments/mmdit_d16.yaml (the main job)"),
    "validate": (None, "SD3 validation loss and sample metrics (FD, caption adherence, W2) of a checkpoint: --config X --ckpt_path CKPT"),
    "test": (None, "the same on the test split"),
    "predict": (None, "Lightning's predict loop"),
    "sample": ("flowmatch.cli.sample", "draw samples from a checkpoint: --ckpt CKPT --prompts \"a 7\" --guidance 1.5 --steps 25 --out samples/"),
    "prepare": ("flowmatch.cli.prepare", "images + captions -> latent/caption shards: --source demo --out data/demo"),
    "reflow": ("flowmatch.cli.reflow", "write (noise, sample) couplings of a trained flow for k-rectified flow: --ckpt CKPT --num-pairs N --out DIR"),
    "import-sd3": ("flowmatch.cli.import_sd3", "convert a local diffusers SD3 transformer directory into a flowmatch checkpoint: DIR --out model.ckpt"),
    "import-flux": ("flowmatch.cli.import_flux", "convert a local diffusers FLUX.1 transformer directory into a flowmatch checkpoint: DIR --out model.ckpt"),
    "export-diffusers": ("flowmatch.cli.export_diffusers", "write a checkpoint's MMDiT or FLUX as a diffusers transformer directory: --ckpt CKPT --out DIR"),
    "export-lora": ("flowmatch.cli.export_lora", "write a LoRA run's adapter as a diffusers LoRA file (or --merge: full weights): CKPT --out DIR"),
    "convert-checkpoint": ("flowmatch.cli.convert_checkpoint", "consolidate a DeepSpeed ZeRO checkpoint directory into one file: DIR --out model.ckpt"),
    "compare": ("flowmatch.cli.compare", "HTML report comparing MLflow runs: --experiment NAME --out report/"),
    "sync-metrics": ("flowmatch.cli.sync_metrics", "send metrics kept while the tracking server was away to their MLflow run: FILE (unsent_metrics.jsonl)"),
    "study": ("flowmatch.cli.study", "run a whole study (variants x seeds, tracked in MLflow) and write docs/results.md: NAME --budget small"),
}
LIGHTNING_COMMANDS = {name for name, (module, _) in COMMANDS.items() if module is None}
OWN_COMMANDS = {name: module for name, (module, _) in COMMANDS.items() if module is not None}

USAGE = "\n".join([
    "usage: python -m flowmatch COMMAND [options]",
    "",
    "Train and compare flow-matching generators (flow matching, rectified flow, eps-DDPM).",
    "",
    "commands:",
    *(f"  {name:<19} {help_line}" for name, (_, help_line) in COMMANDS.items()),
    "",
    "`python -m flowmatch COMMAND --help` explains each command's options;",
    "`python -m flowmatch fit --config X.yaml --print_config` shows the fully resolved config.",
    "Runs are tracked in MLflow: the store is $MLFLOW_TRACKING_URI, by default sqlite:///mlflow.db",
    "(browse it with: mlflow ui --backend-store-uri sqlite:///mlflow.db).",
])

def _quiet_known_warnings() -> None:
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # emitted by Lightning's own calls
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Filesystem tracking backend.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def _check_ckpt_path(args: list[str]) -> None:
    from flowmatch.checkpoints import read_checkpoint

    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--ckpt_path" and i + 1 < len(args) else arg.partition("=")[2] if arg.startswith("--ckpt_path=") else None
        if value and value not in ("last", "best", "hpc", "registry", "null"):
            read_checkpoint(value)


def _close_process_group() -> None:
    """Destroy a distributed run's process group before the interpreter exits: left to exit, gloo's threads
    sometimes abort the process ("terminate called without an active exception", status -6) after a good run."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # a broken group (a peer gone) has nothing left to close
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    _quiet_known_warnings()
    command, rest = argv[0], argv[1:]
    if command in OWN_COMMANDS:
        module = importlib.import_module(OWN_COMMANDS[command])
        return module.main(rest)
    if command in LIGHTNING_COMMANDS:
        from flowmatch.adapters.lora import AdapterError
        from flowmatch.checkpoints import CheckpointError
        from flowmatch.cli.lightning_cli import FlowCLI
        from flowmatch.data.health import DataQualityError
        from flowmatch.data.shard_format import ManifestMismatchError, ShardFormatError
        from flowmatch.training.divergence import NonFiniteLossError
        from flowmatch.tracking.server import TrackingServerError

        try:
            _check_ckpt_path(rest)  # Lightning reads it while parsing: report a bad one first, clearly
            FlowCLI(args=argv)
        except (NonFiniteLossError, CheckpointError, DataQualityError, ManifestMismatchError, ShardFormatError, TrackingServerError,
                AdapterError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except RuntimeError as err:  # a distributed run that lost a process: say so, not gloo's traceback
            from flowmatch.training.lost_peer import lost_peer_message

            message = lost_peer_message(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 1
        finally:
            _close_process_group()
        return 0
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
