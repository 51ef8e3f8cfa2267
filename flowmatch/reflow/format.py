"""The coupling shard format: (noise, sample, condition) pairs of a trained flow, as webdataset tars.

A coupling set is a directory::

    DIR/manifest.json            what the pairs are and how they were made (see below)
    DIR/couplings-000000.tar     webdataset shards, ``shard_size`` pairs each (the last may hold fewer)
    DIR/couplings-000001.tar     ...

Inside a shard, one tar *record* holds a block of consecutive pairs (pairs are independent draws,
so a block is as good a unit of shuffling as a single pair; small data such as 2-D points would
otherwise spend ~1.5 KB of tar headers on 16 bytes of payload):

====================  ==================================================================
file in the tar       content
====================  ==================================================================
KEY.noise.npy         float32 (n, *noise_shape): eps, the starting point at t = 1
KEY.sample.npy        float32 (n, *sample_shape): Z_0(eps), the flow's sample at t = 0
KEY.cond.npy          int64 (n,): class labels (only in class-conditional sets)
KEY.pooled.npy        (n, P) pooled text vectors            \
KEY.mask.npy          bool (n, L): True at the real tokens   | only in text-conditional sets
KEY.tokens.npy        (sum of mask, D): the real tokens'     | (``condition: text``): the
                      states, pair after pair (the padded    | stored encodings the pairs were
                      positions of the model's input are 0)  | drawn with, in their own dtype
KEY.caption.json      {"captions": [...], "sources": [...]} /  (float16 from the shards)
====================  ==================================================================

A text record reads back as the model's conditioning dict ``{"pooled": (n, P), "tokens": (n, L, D)
(zeros at the padded positions), "mask": (n, L)}`` and the caption text of each pair (``sources``:
which training sample and which of its captions, e.g. "train_0000012/syn", for people).

``KEY`` is ``pairs_{index of the block's first pair:010d}`` (no dots: webdataset splits keys at
dots), so every pair has a global index and a reader checks that none is missing or repeated.

The manifest: ``format``/``version``, ``count`` (pairs), ``noise_shape``, ``sample_shape``,
``dtype``, ``conditional``, ``condition`` ("none", "label" or "text"; sets without it: "label" when
conditional), ``num_classes``, ``labels`` (how conditions were drawn), ``guidance``, for text sets
``text`` (pooled_dim, context_dim, context_length, dtype, and where the captions came from) and
``data`` (the latent/caption data facts of the source model, flowmatch.data.latent_info),
``source_checkpoint``, ``objective``, ``weights`` (raw / ema), ``sampler`` (solver, steps, tolerances,
shift, grid, name), ``nfe`` (mean per batch) and ``nfe_max``, ``seed``, ``batch_size``,
``record_size``, ``shard_size``, ``shards`` ([{name, count}]), ``rectified`` (k of the k-rectified
flow these pairs train: 2 for pairs drawn from a model trained on data), ``source_couplings``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from flowmatch.atomic_io import atomic_write
from flowmatch.networks.conditioning import ConditioningSpec

FORMAT_NAME = "flowmatch-couplings"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "couplings-{:06d}.tar"
NOISE, SAMPLE, COND = "noise.npy", "sample.npy", "cond.npy"
POOLED, MASK, TOKENS, CAPTION = "pooled.npy", "mask.npy", "tokens.npy", "caption.json"
TEXT_FILES = (POOLED, MASK, TOKENS, CAPTION)
TEXT_KEYS = ("pooled", "tokens", "mask")  # the conditioning dict of a text model
KEY_PREFIX = "pairs_"
DTYPE = np.float32
REQUIRED_MANIFEST_FIELDS = ("format", "version", "count", "noise_shape", "sample_shape", "conditional", "shards")


class CouplingFormatError(ValueError):
    """A coupling directory, manifest, shard or record that does not follow the format (names file and key)."""


@dataclass
class CouplingRecord:
    """A block of consecutive pairs: global indices first .. first + len(noise) - 1.

    ``cond``: None, int64 class labels (n,), or a text model's conditioning dict {"pooled": (n, P),
    "tokens": (n, L, D), "mask": bool (n, L)} (then ``captions`` holds each pair's caption text and
    ``sources`` where it came from).
    """

    first: int
    noise: np.ndarray
    sample: np.ndarray
    cond: np.ndarray | dict[str, np.ndarray] | None = None
    captions: list[str] | None = None
    sources: list[str] | None = None

    def __len__(self) -> int:
        return int(self.noise.shape[0])


def condition_kind(manifest: dict[str, Any]) -> str:
    """"none", "label" or "text": what the pairs of a coupling set are conditioned on."""
    if not manifest.get("conditional"):
        return "none"
    return str(manifest.get("condition") or "label")


def manifest_conditioning(manifest: dict[str, Any]) -> ConditioningSpec:
    """What a coupling set's pairs are conditioned on, as the networks declare it: class labels (the manifest's
    ``num_classes``), the stored text encodings (``text``: pooled_dim, context_dim, context_length) or nothing."""
    kind = condition_kind(manifest)
    where = manifest.get("directory", "a coupling manifest")
    if kind == "text":
        text = manifest.get("text")
        if not isinstance(text, dict) or not all(k in text for k in ("pooled_dim", "context_dim", "context_length")):
            raise CouplingFormatError(f"{where}: a text coupling manifest needs 'text' with pooled_dim, context_dim and context_length")
        return ConditioningSpec.text(int(text["pooled_dim"]), int(text["context_dim"]), int(text["context_length"]))
    if kind == "label":
        num_classes = int(manifest.get("num_classes") or 0)
        if num_classes < 1:
            raise CouplingFormatError(f"{where}: a class-conditional coupling manifest needs num_classes >= 1, got {manifest.get('num_classes')!r}")
        return ConditioningSpec(num_classes=num_classes)
    return ConditioningSpec()


def check_text_cond(cond: Any, n: int, where: str) -> dict[str, np.ndarray]:
    """A text conditioning dict of ``n`` pairs, checked: pooled (n, P), tokens (n, L, D), mask bool (n, L)."""
    if not isinstance(cond, dict) or set(cond) != set(TEXT_KEYS):
        raise ValueError(f"{where}: a text condition is a dict with keys {list(TEXT_KEYS)}, got "
                         f"{sorted(cond) if isinstance(cond, dict) else type(cond).__name__}")
    pooled, tokens, mask = (np.asarray(cond[k]) for k in ("pooled", "tokens", "mask"))
    if pooled.ndim != 2 or tokens.ndim != 3 or mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"{where}: expected pooled (n, P), tokens (n, L, D) and a bool mask (n, L), got "
                         f"{pooled.shape}, {tokens.shape} and {mask.dtype} {mask.shape}")
    if not pooled.shape[0] == tokens.shape[0] == mask.shape[0] == n or mask.shape[1] != tokens.shape[1]:
        raise ValueError(f"{where}: pooled {pooled.shape}, tokens {tokens.shape} and mask {mask.shape} do not fit {n} pairs")
    return {"pooled": pooled, "tokens": tokens, "mask": mask}


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def record_key(first: int) -> str:
    return f"{KEY_PREFIX}{first:010d}"


def parse_record_key(key: str, where: str) -> int:
    if not key.startswith(KEY_PREFIX) or not key[len(KEY_PREFIX):].isdigit():
        raise CouplingFormatError(f"{where}: record key {key!r} is not {KEY_PREFIX}<index>")
    return int(key[len(KEY_PREFIX):])


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CouplingFormatError(f"{where}: not a readable .npy payload ({err})") from None



# --- writing ---------------------------------------------------------------------------------------
def write_shard(path: str | Path, records: Iterable[CouplingRecord]) -> int:
    """Write records to ``path`` atomically (a temporary file beside it, fsync, rename); returns the pair count.

    Tar members get a fixed mtime, so the same records always give a byte-identical shard.
    """
    import webdataset as wds

    count = 0
    with atomic_write(path) as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for rec in records:
            if rec.noise.shape[0] != rec.sample.shape[0] or (isinstance(rec.cond, np.ndarray) and rec.cond.shape[0] != rec.noise.shape[0]):
                raise ValueError(f"record {rec.first}: noise, sample and cond must hold the same number of pairs")
            item = {"__key__": record_key(rec.first), NOISE: npy_bytes(rec.noise.astype(DTYPE, copy=False)),
                    SAMPLE: npy_bytes(rec.sample.astype(DTYPE, copy=False))}
            if isinstance(rec.cond, dict):
                item.update(_text_members(rec))
            elif rec.cond is not None:
                item[COND] = npy_bytes(rec.cond.astype(np.int64, copy=False))
            writer.write(item)
            count += len(rec)
        writer.close()
    return count


def _text_members(rec: CouplingRecord) -> dict[str, bytes]:
    """The tar members of a text record: pooled, mask, the real tokens only, and the captions."""
    n = len(rec)
    cond = check_text_cond(rec.cond, n, f"record {rec.first}")
    tokens, mask = cond["tokens"], cond["mask"]
    padded = tokens[~mask]
    if padded.size and np.ascontiguousarray(padded).view(np.uint8).any():  # bitwise: -0.0 would not come back either
        raise ValueError(f"record {rec.first}: the tokens hold non-zero values at padded positions (mask False); the coupling "
                         "format stores only the real tokens, as the latent shards do")
    captions = list(rec.captions) if rec.captions is not None else None
    sources = list(rec.sources) if rec.sources is not None else [""] * n
    if captions is None or len(captions) != n or len(sources) != n or not all(isinstance(c, str) for c in captions + sources):
        raise ValueError(f"record {rec.first}: a text record needs one caption (and source) string per pair, "
                         f"got {None if captions is None else len(captions)} captions for {n} pairs")
    return {POOLED: npy_bytes(cond["pooled"]), MASK: npy_bytes(mask), TOKENS: npy_bytes(tokens[mask]),
            CAPTION: json.dumps({"captions": captions, "sources": sources}, ensure_ascii=False).encode("utf-8")}


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write DIR/manifest.json atomically."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    with atomic_write(path, "w") as f:
        json.dump({"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest}, f, indent=2)
    return path


# --- reading ---------------------------------------------------------------------------------------
def read_manifest(location: str | Path) -> dict[str, Any]:
    """The manifest of a coupling set: ``location`` is the directory or its manifest.json. Checked."""
    location = Path(location)
    path = location / MANIFEST_NAME if location.is_dir() else location
    if not path.exists():
        hint = " (an unfinished `reflow` run leaves DIR.partial/ instead; run it again to finish)" if Path(f"{location}.partial").exists() else ""
        raise CouplingFormatError(f"no coupling manifest at {path}: not a directory written by `python -m flowmatch reflow`{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CouplingFormatError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CouplingFormatError(f"{path} is not a coupling manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT_NAME!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise CouplingFormatError(f"{path}: format version {manifest.get('version')!r}, this reader knows {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_MANIFEST_FIELDS if k not in manifest]
    if missing:
        raise CouplingFormatError(f"{path}: missing fields {missing}")
    if sum(int(s["count"]) for s in manifest["shards"]) != manifest["count"]:
        raise CouplingFormatError(f"{path}: the shards' counts do not add up to count={manifest['count']}")
    manifest["directory"] = str(path.parent)
    return manifest


def shard_paths(manifest: dict[str, Any]) -> list[Path]:
    """The shard files of a manifest (checked to exist), in index order."""
    directory = Path(manifest["directory"])
    paths = [directory / s["name"] for s in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CouplingFormatError(f"coupling shards listed in {directory / MANIFEST_NAME} are missing: {missing[:3]}")
    return paths


def iter_shard(path: str | Path, manifest: dict[str, Any] | None = None) -> Iterator[CouplingRecord]:
    """The records of one shard file in file order, decoded and checked against the manifest's shapes."""
    import webdataset as wds

    path = str(path)
    noise_shape = tuple(manifest["noise_shape"]) if manifest else None
    sample_shape = tuple(manifest["sample_shape"]) if manifest else None
    kind = condition_kind(manifest) if manifest else None
    text_dims = (manifest.get("text") or {}) if manifest else {}
    try:
        for raw in wds.tarfile_to_samples()(iter([{"url": path}])):
            key = raw["__key__"]
            where = f"{path}, record {key}"
            first = parse_record_key(key, where)
            for name in (NOISE, SAMPLE):
                if name not in raw:
                    raise CouplingFormatError(f"{where}: no {name} (has {sorted(k for k in raw if not k.startswith('__'))})")
            noise, sample = _load_npy(raw[NOISE], f"{where}.{NOISE}"), _load_npy(raw[SAMPLE], f"{where}.{SAMPLE}")
            has_text = any(name in raw for name in TEXT_FILES)
            found = "text" if has_text else "label" if COND in raw else "none"
            if kind is not None and kind != found:
                raise CouplingFormatError(f"{where}: the manifest's pairs are conditioned on {kind!r} but the record holds "
                                          f"{'no condition' if found == 'none' else found + ' conditions'} "
                                          f"(has {sorted(k for k in raw if not k.startswith('__'))})")
            captions = sources = None
            if found == "text":
                cond, captions, sources = _read_text_members(raw, noise.shape[0], where, text_dims)
            else:
                cond = _load_npy(raw[COND], f"{where}.{COND}") if COND in raw else None
            if noise.ndim < 1 or sample.shape[:1] != noise.shape[:1] or (isinstance(cond, np.ndarray) and cond.shape != noise.shape[:1]):
                raise CouplingFormatError(f"{where}: noise {noise.shape}, sample {sample.shape} and cond {None if cond is None else getattr(cond, 'shape', 'text')} do not hold the same number of pairs")
            if noise_shape is not None and (noise.shape[1:] != noise_shape or sample.shape[1:] != sample_shape):
                raise CouplingFormatError(f"{where}: shapes {noise.shape[1:]} / {sample.shape[1:]} differ from the manifest's {noise_shape} / {sample_shape}")
            yield CouplingRecord(first, noise, sample, cond, captions, sources)
    except CouplingFormatError:
        raise
    except Exception as err:  # tarfile / webdataset errors on a truncated or corrupt file
        raise CouplingFormatError(f"{path}: unreadable coupling shard ({type(err).__name__}: {err})") from None


def _read_text_members(raw: dict, n: int, where: str, dims: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """A text record's conditioning dict (tokens scattered back to (n, L, D)), captions and sources, checked."""
    missing = [name for name in TEXT_FILES if name not in raw]
    if missing:
        raise CouplingFormatError(f"{where}: a text record needs {list(TEXT_FILES)}; missing {missing}")
    pooled, mask = _load_npy(raw[POOLED], f"{where}.{POOLED}"), _load_npy(raw[MASK], f"{where}.{MASK}")
    real = _load_npy(raw[TOKENS], f"{where}.{TOKENS}")
    if mask.dtype != bool or mask.ndim != 2 or mask.shape[0] != n:
        raise CouplingFormatError(f"{where}.{MASK}: expected bool ({n}, L), got {mask.dtype} {mask.shape}")
    if pooled.ndim != 2 or pooled.shape[0] != n:
        raise CouplingFormatError(f"{where}.{POOLED}: expected ({n}, P), got {pooled.shape}")
    if real.ndim != 2 or real.shape[0] != int(mask.sum()):
        raise CouplingFormatError(f"{where}.{TOKENS}: expected ({int(mask.sum())} real tokens, D) for the mask, got {real.shape}")
    for what, have, want in (("pooled_dim", pooled.shape[1], dims.get("pooled_dim")), ("context_length", mask.shape[1], dims.get("context_length")),
                             ("context_dim", real.shape[1], dims.get("context_dim"))):
        if want is not None and int(have) != int(want):
            raise CouplingFormatError(f"{where}: {what} {have} differs from the manifest's {want}")
    tokens = np.zeros((n, mask.shape[1], real.shape[1]), dtype=real.dtype)
    tokens[mask] = real
    try:
        text = json.loads(raw[CAPTION].decode("utf-8"))
        captions, sources = list(text["captions"]), list(text["sources"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CouplingFormatError(f"{where}.{CAPTION}: unreadable captions ({type(err).__name__}: {err})") from None
    if len(captions) != n or len(sources) != n:
        raise CouplingFormatError(f"{where}.{CAPTION}: {len(captions)} captions / {len(sources)} sources for {n} pairs")
    return {"pooled": pooled, "tokens": tokens, "mask": mask}, captions, sources


def iter_records(location: str | Path) -> Iterator[CouplingRecord]:
    """Every record of a coupling set in index order, checking that the indices run 0, 1, ... count - 1."""
    manifest = read_manifest(location)
    expected = 0
    for path, info in zip(shard_paths(manifest), manifest["shards"]):
        start = expected
        for rec in iter_shard(path, manifest):
            if rec.first != expected:
                raise CouplingFormatError(f"{path}: record {record_key(rec.first)} where pair {expected} was expected (a shard is missing, repeated or out of order)")
            expected += len(rec)
            yield rec
        if expected - start != int(info["count"]):
            raise CouplingFormatError(f"{path}: holds {expected - start} pairs, the manifest says {info['count']}")
    if expected != manifest["count"]:
        raise CouplingFormatError(f"{location}: {expected} pairs read, the manifest says {manifest['count']}")


def read_couplings(location: str | Path) -> dict[str, Any]:
    """All pairs of a coupling set in memory, as written: {"noise", "sample", "cond"} (cond None if
    unconditional, int64 labels, or for text sets the dict {"pooled", "tokens", "mask"}), and for text
    sets "captions" and "sources" (lists of str)."""
    manifest = read_manifest(location)
    records = list(iter_records(location))
    shape = lambda key: (0, *manifest[f"{key}_shape"])  # noqa: E731
    noise = np.concatenate([r.noise for r in records]) if records else np.zeros(shape("noise"), DTYPE)
    sample = np.concatenate([r.sample for r in records]) if records else np.zeros(shape("sample"), DTYPE)
    kind = condition_kind(manifest)
    out: dict[str, Any] = {"noise": noise, "sample": sample, "cond": None}
    if kind == "label":
        out["cond"] = np.concatenate([r.cond for r in records]) if records else np.zeros((0,), np.int64)
    elif kind == "text":
        if not records:
            raise CouplingFormatError(f"{location}: a text coupling set without pairs")
        out["cond"] = {k: np.concatenate([r.cond[k] for r in records]) for k in TEXT_KEYS}
        out["captions"] = [c for r in records for c in r.captions]
        out["sources"] = [c for r in records for c in r.sources]
    return out
