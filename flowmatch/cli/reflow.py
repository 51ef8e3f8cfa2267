"""`python -m flowmatch reflow`: draw (noise, sample) couplings from a trained flow, for k-rectified flow (docs/spec.md §5).

Fresh noise eps ~ N(0, I) (its own --seed) is integrated by the trained model from t = 1 to t = 0 with
the chosen solver; the pairs (eps, Z_0(eps)) and, for a class-conditional model, the label each was
generated with are written as webdataset shards OUT/couplings-NNNNNN.tar plus OUT/manifest.json
(flowmatch.reflow.format). The run writes into OUT.partial/ and renames it when complete; an
interrupted run continues where it stopped when given the same command again.

A text-to-image model (trained on latent/caption shards) draws each pair's condition from the captions
of its training split (SD3's 50:50 original / synthetic mixing, seeded by --seed), integrates with the
given guidance (the network's own null condition for the unconditional pass), and writes the caption
and its stored encodings (pooled, tokens, mask) with the pair. The shards are the ones the checkpoint
records (or --data DIR / manifest / data config).

Then train the next rectified flow on the pairs:

    python -m flowmatch fit --config experiments/toy2d_reflow.yaml --data.init_args.path OUT --model.init_args.init_weights CKPT
    python -m flowmatch fit --config experiments/digits_reflow.yaml --data.init_args.path OUT --model.init_args.init_weights CKPT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser

from flowmatch.sampling import SOLVERS, SamplerConfig
from flowmatch.sampling.time_grid import GRID_KINDS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch reflow", description=__doc__, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint of the trained flow (from `python -m flowmatch fit`)")
    p.add_argument("--out", type=str, required=True, help="coupling directory to create (OUT/couplings-*.tar, OUT/manifest.json)")
    p.add_argument("--num-pairs", "--num_pairs", type=int, required=True, help="number of (noise, sample) pairs")
    p.add_argument("--solver", type=str, default="dopri5", help=f"ODE solver: one of {', '.join(SOLVERS)}")
    p.add_argument("--steps", type=int, default=100, help="solver steps (ignored by the adaptive dopri5)")
    p.add_argument("--shift", type=float, default=1.0, help="SD3 resolution shift of the time grid (1 = none)")
    p.add_argument("--grid", type=str, default="plain", help=f"time grid: one of {', '.join(GRID_KINDS)}")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale the pairs are drawn with (recorded in the manifest)")
    p.add_argument("--labels", type=str, default="auto",
                   help="conditions of a class-conditional model: auto (uniform if the model has classes, else none), "
                        "uniform, none (the null class), data (the label distribution of --data's training set), or a list such as [0,3] (cycled)")
    p.add_argument("--data", type=str, default=None,
                   help="a data module config (YAML with class_path / init_args, e.g. configs/data/toy2d.yaml) for --labels data; for a "
                        "text model the latent/caption shards whose captions condition the pairs (a directory with manifest.json, the "
                        "manifest, or a data module config such as configs/data/demo_digits.yaml; default: the data the checkpoint records)")
    p.add_argument("--captions-split", "--captions_split", type=str, default="train",
                   help="text models: the split of the shards whose captions condition the pairs (default train, the captions the model learned)")
    p.add_argument("--synthetic-caption-prob", "--synthetic_caption_prob", type=float | None, default=None,
                   help="text models: probability of a sample's synthetic caption (default: the data config's, else 0.5 as in SD3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of uniformly drawn labels)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=4096, help="pairs integrated at once")
    p.add_argument("--shard-size", "--shard_size", type=int | None, default=None, help="pairs per shard file (default: ~256 MiB per shard)")
    p.add_argument("--record-size", "--record_size", type=int | None, default=None, help="pairs per tar record (default: ~64 KiB per record)")
    p.add_argument("--weights", type=str, default="auto", help="auto (EMA weights when the checkpoint has them), ema or raw")
    p.add_argument("--device", type=str, default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing OUT (and an unfinished run with other settings)")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar (on a terminal)")
    return p


def _labels_from_data(config: str, num: int) -> np.ndarray:
    """The labels of the first ``num`` training samples of a data module (its own order), cycled if it holds fewer."""
    import yaml
    from jsonargparse import ArgumentParser as Parser
    from lightning.pytorch import LightningDataModule

    path = Path(config)
    if not path.is_file():
        raise ValueError(f"--data {config}: no such file")
    spec = yaml.safe_load(path.read_text())
    parser = Parser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", fail_untyped=False)
    try:
        dm = parser.instantiate_classes(parser.parse_object({"data": spec})).data
    except Exception as err:
        raise ValueError(f"--data {config}: not a data module config ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    dm.setup("fit")
    labels: list[np.ndarray] = []
    total = 0
    for batch in dm.train_dataloader():
        if not isinstance(batch, dict) or "cond" not in batch:
            raise ValueError(f"--data {config}: its batches carry no 'cond' labels (is the data module conditional?)")
        labels.append(np.asarray(batch["cond"], dtype=np.int64))
        total += len(labels[-1])
        if total >= num:
            break
    arr = np.concatenate(labels)
    return np.resize(arr, num)  # cycles when the training set is smaller


def _labels(spec: str, data: str | None, num: int):
    spec = spec.strip()
    if spec in ("auto", "uniform", "none"):
        return spec
    if spec == "data":
        if data is None:
            raise ValueError("--labels data needs --data CONFIG.yaml (a data module config)")
        return _labels_from_data(data, num)
    try:
        values = json.loads(spec)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
        raise ValueError(f"--labels {spec!r}: expected auto, uniform, none, data or a list of class labels such as [0,3]")
    return values


def _text_source(data: str | None, model) -> tuple[str, float | None]:
    """The shard set (manifest location) whose captions condition a text model's pairs, and the data config's caption mixing."""
    if data is None:
        info = getattr(model, "data_info", None)
        location = info.get("manifest") if isinstance(info, dict) else None
        if not location:
            raise ValueError("the checkpoint is of a text-conditioned model but does not record the latent/caption shards it was "
                             "trained on (written before checkpoints recorded their data?): give --data DIR (the shards' directory)")
        return str(location), None
    path = Path(data)
    if data.endswith((".yaml", ".yml")):
        import yaml

        if not path.is_file():
            raise ValueError(f"--data {data}: no such file")
        spec = yaml.safe_load(path.read_text()) or {}
        args = spec.get("init_args") or {} if isinstance(spec, dict) else {}
        if args.get("text_encoders"):
            raise ValueError(f"--data {data}: the data config encodes captions on the fly (text_encoders); text couplings record the "
                             "stored encodings of the shards: use shards written with encodings")
        location = args.get("manifest") or (str(Path(args["data_dir"]) / "manifest.json") if args.get("data_dir") else None)
        if location is None and isinstance(args.get("shards"), str):
            location = str(Path(args["shards"]).parent / "manifest.json")
        if location is None:
            raise ValueError(f"--data {data}: the data config names no shard set (init_args.data_dir, manifest or shards)")
        prob = args.get("synthetic_caption_prob")
        return location, None if prob is None else float(prob)
    if "://" not in data and not path.exists():
        raise ValueError(f"--data {data}: no such directory or manifest")
    return data, None


def _source_info(ckpt_path: str, model) -> dict:
    """What the manifest records about the model: checkpoint, objective, weights, which rectified flow it is."""
    from flowmatch.checkpoints import read_client_state
    from flowmatch.reflow.format import CouplingFormatError, read_manifest

    path = Path(ckpt_path).resolve()
    stat = path.stat()
    info = {"source_checkpoint": str(path), "objective": type(model).__name__, "weights": getattr(model, "loaded_weights", "raw"),
            "checkpoint_stamp": f"{stat.st_size}-{stat.st_mtime_ns}", "source_couplings": None, "source_rectified": 1}
    state = read_client_state(path)
    dm_state = state.get("CouplingDataModule")  # written by CouplingDataModule.state_dict
    dm_hparams = state.get("datamodule_hyper_parameters") or {}
    if isinstance(dm_state, dict) and dm_state.get("couplings"):
        info["source_couplings"] = dm_state["couplings"]
        info["source_rectified"] = dm_state.get("rectified")
    elif isinstance(dm_hparams, dict) and dm_hparams.get("path"):  # a coupling path without the state: read its manifest
        info["source_couplings"] = str(dm_hparams["path"])
        try:
            info["source_rectified"] = read_manifest(dm_hparams["path"]).get("rectified")
        except CouplingFormatError:
            info["source_rectified"] = None  # trained on couplings that are no longer there: unknown k
    info["rectified"] = info["source_rectified"] + 1 if info["source_rectified"] else None
    return info


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_grad_enabled(False)
    from flowmatch.checkpoints import CheckpointError
    from flowmatch.objectives.loading import load_objective
    from flowmatch.reflow.captions import CaptionSourceError, TrainingCaptions
    from flowmatch.reflow.couplings import CouplingRunError, generate_couplings, model_conditioning, model_is_text_conditioned
    from flowmatch.reflow.format import CouplingFormatError

    out = Path(args.out)
    try:
        sampler = SamplerConfig(solver=args.solver, steps=args.steps, shift=args.shift, grid=args.grid,
                                guidance=args.guidance, rtol=args.rtol, atol=args.atol)
        if args.weights not in ("auto", "ema", "raw"):
            raise ValueError(f"--weights must be auto, ema or raw, got {args.weights!r}")
        model = load_objective(args.ckpt, map_location=args.device, weights=args.weights)
        captions = None
        if model_is_text_conditioned(model):
            if args.labels.strip() != "auto":
                raise ValueError(f"--labels {args.labels}: the checkpoint is of a text-conditioned model, whose pairs are conditioned on "
                                 "captions of its training data (see --data, --captions-split), not on labels")
            location, prob = _text_source(args.data, model)
            prob = args.synthetic_caption_prob if args.synthetic_caption_prob is not None else prob if prob is not None else 0.5
            captions = TrainingCaptions(location, split=args.captions_split, synthetic_prob=prob)
            labels = "auto"
        else:
            if args.synthetic_caption_prob is not None or args.captions_split != "train":
                raise ValueError("--synthetic-caption-prob and --captions-split are for text-conditioned models; this checkpoint's model "
                                 f"takes {'class labels' if model_conditioning(model).num_classes else 'no condition'}")
            labels = _labels(args.labels, args.data, args.num_pairs)
        source = _source_info(args.ckpt, model)
        manifest = generate_couplings(model, out, args.num_pairs, sampler, seed=args.seed, batch_size=args.batch_size, labels=labels,
                                      shard_size=args.shard_size, record_size=args.record_size, overwrite=args.overwrite,
                                      progress=args.progress, source=source, captions=captions)
    except (CheckpointError, CouplingFormatError, CouplingRunError, CaptionSourceError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards are kept in {out}.partial/; run the same command again to continue", file=sys.stderr)
        return 130
    text = manifest.get("condition") == "text"
    if text:
        t = manifest["text"]
        cond = (f", captions of the {t['split']} split of {t['captions_from']} ({t['num_samples']} samples, "
                f"synthetic p={t['synthetic_caption_prob']:g}), guidance {manifest['guidance']:g}")
    else:
        cond = f", labels {manifest['labels']}, guidance {manifest['guidance']:g}" if manifest["conditional"] else ""
    print(f"wrote {manifest['count']} couplings ({manifest['sampler']['name']}, NFE {manifest['nfe']:.1f} per batch{cond}, "
          f"{manifest['seconds']:.1f} s) to {out} ({len(manifest['shards'])} shard(s), manifest {out / 'manifest.json'})")
    k = manifest.get("rectified")
    config = "experiments/digits_reflow.yaml" if text else "experiments/toy2d_reflow.yaml"
    print(f"train the {f'{k}-' if k else 'next '}rectified flow on them:  python -m flowmatch fit --config {config} "
          f"--data.init_args.path {out} --model.init_args.init_weights {args.ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
