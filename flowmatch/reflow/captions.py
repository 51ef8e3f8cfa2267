"""The conditions of text-conditioned couplings: captions of a latent/caption shard set's training split.

A text-to-image flow's couplings are (eps, Z_0(eps | c), c): the condition c is part of the pair (the
k-RF learns the conditional coupling). ``TrainingCaptions`` reads a split of the shards the source model
trained on (every sample's original and synthetic caption with their stored encodings) and gives
pair i its condition as a function of (seed, i) alone, so shards can be drawn in any order and an
interrupted run resumes to the same pairs:

* pass c = i // N over the N samples of the split visits them in a permutation seeded by (seed, c);
* the sample takes its synthetic caption with probability ``synthetic_prob`` (SD3's 50 : 50 mixing,
  flowmatch.data.captions.use_synthetic(p, seed, c, key): a hash, as the training loader draws it);
* the condition is that caption's stored encoding ({"pooled", "tokens", "mask"}, zeros at the padded
  token positions: exactly the dict the model trained on, in the shards' dtype, float16).

Only stored encodings are used: a shard set without them (captions encoded on the fly) is refused, since
a coupling must record the condition the teacher actually saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowmatch.data.captions import use_synthetic
from flowmatch.data.shard_format import MANIFEST_NAME, SPLITS, SampleSpec, ShardFormatError, read_manifest
from flowmatch.networks.conditioning import ConditioningSpec

ROWS = ("orig", "syn")


class CaptionSourceError(ValueError):
    """The captions to condition couplings on cannot be had (names the shard set and what is missing)."""


def _seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) for p in parts])


class TrainingCaptions:
    """Every sample of one split of a latent/caption shard set: its two captions and their stored encodings.

    Args:
        location: the shard set (a directory with manifest.json, the manifest's path, or its URL).
        split: which split's captions condition the pairs ("train": the captions the model trained on).
        synthetic_prob: probability that a pair takes its sample's synthetic caption (SD3: 0.5).
    """

    def __init__(self, location: str, split: str = "train", synthetic_prob: float = 0.5):
        if split not in SPLITS:
            raise CaptionSourceError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
        if not 0.0 <= synthetic_prob <= 1.0:
            raise CaptionSourceError(f"synthetic_prob must be in [0, 1], got {synthetic_prob}")
        location = str(location)
        if "://" not in location:  # a local shard set: recorded as an absolute path, so it works from any directory
            location = str(Path(location).resolve() / MANIFEST_NAME) if Path(location).is_dir() else str(Path(location).resolve())
        try:
            manifest, base = read_manifest(location)
        except (ShardFormatError, OSError, ValueError) as err:
            raise CaptionSourceError(f"cannot read the shard manifest {location}: {err}") from None
        spec = SampleSpec(manifest)
        if not spec.encodings:
            raise CaptionSourceError(f"{location}: the shards hold no text encodings (captions are encoded on the fly); text couplings "
                                     "record the stored encodings the model was conditioned on: write the shards with encodings "
                                     "(python -m flowmatch prepare, the default) and train on those")
        if not spec.pooled_dim:
            raise CaptionSourceError(f"{location}: the shards' encodings have no pooled vector (text.pooled_dim = 0)")
        names = (manifest.get("splits") or {}).get(split, {}).get("shards") or []
        if not names:
            raise CaptionSourceError(f"{location}: no {split} split in the manifest")
        self.location, self.split, self.synthetic_prob = location, split, float(synthetic_prob)
        self.pooled_dim, self.context_dim, self.context_length = spec.pooled_dim, spec.context_dim, spec.context_length
        join = (lambda n: base.rstrip("/") + "/" + n) if "://" in base else (lambda n: str(Path(base) / n))
        self._read([join(n) for n in names], spec)

    def _read(self, urls: list[str], spec: SampleSpec) -> None:
        import webdataset as wds

        keys, captions, labels, pooled, masks, tokens = [], [], [], [], [], []
        for url in urls:
            if "://" not in url and not Path(url).is_file():
                raise CaptionSourceError(f"{self.split} shard {url} is missing (manifest {self.location})")
            try:
                for raw in wds.tarfile_to_samples()(iter([{"url": url}])):
                    s = spec.decode(raw)
                    keys.append(s["key"])
                    captions.append((s["caption"], s["caption_syn"]))
                    labels.append(s["label"])
                    for row in ROWS:
                        t, m, p = s[row]
                        pooled.append(np.asarray(p))
                        masks.append(np.asarray(m, dtype=bool))
                        tokens.append(np.asarray(t))
            except ShardFormatError as err:
                raise CaptionSourceError(f"{self.split} captions: {err}") from None
            except Exception as err:  # a truncated or corrupt tar
                raise CaptionSourceError(f"{url}: unreadable shard ({type(err).__name__}: {err})") from None
        if not keys:
            raise CaptionSourceError(f"the {self.split} split of {self.location} holds no samples")
        self.keys, self.captions, self.labels = keys, captions, labels
        self.pooled = np.stack(pooled)  # (2N, P): row 2j = original, 2j + 1 = synthetic caption of sample j
        self.masks = np.stack(masks)  # (2N, L)
        self.tokens = np.concatenate(tokens)  # (real tokens of all rows, D)
        self.offsets = np.concatenate([[0], np.cumsum([t.shape[0] for t in tokens])])
        self.dtype = self.tokens.dtype

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def conditioning(self) -> ConditioningSpec:
        """What the captions' stored encodings provide: one pooled vector and one token stream of this width and length."""
        return ConditioningSpec.text(self.pooled_dim, self.context_dim, self.context_length)

    def describe(self) -> dict:
        """What a coupling manifest records about the captions."""
        return {"captions_from": self.location, "split": self.split, "num_samples": len(self), "synthetic_caption_prob": self.synthetic_prob,
                "pooled_dim": self.pooled_dim, "context_dim": self.context_dim, "context_length": self.context_length,
                "dtype": np.dtype(self.dtype).name}

    def _rows(self, first: int, n: int, seed: int) -> np.ndarray:
        """Row (2 * sample + synthetic) of pairs first .. first + n - 1."""
        num = len(self)
        idx = np.arange(first, first + n, dtype=np.int64)
        passes, pos = idx // num, idx % num
        rows = np.empty(n, dtype=np.int64)
        for c in np.unique(passes):
            perm = np.random.default_rng(_seed(seed, 0x63617074, int(c))).permutation(num)  # 0x63617074: "capt"
            sel = passes == c
            samples = perm[pos[sel]]
            syn = [use_synthetic(self.synthetic_prob, seed, int(c), self.keys[j]) for j in samples]
            rows[sel] = 2 * samples + np.asarray(syn, dtype=np.int64)
        return rows

    def conditions(self, first: int, n: int, seed: int) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """The conditions of pairs first .. first + n - 1: ({"pooled" (n, P), "tokens" (n, L, D), "mask" (n, L)},
        captions, sources "KEY/orig" or "KEY/syn")."""
        rows = self._rows(first, n, seed)
        masks = self.masks[rows]
        tokens = np.zeros((n, self.context_length, self.context_dim), dtype=self.dtype)
        tokens[masks] = np.concatenate([self.tokens[self.offsets[r] : self.offsets[r + 1]] for r in rows])
        captions = [self.captions[r // 2][r % 2] for r in rows]
        sources = [f"{self.keys[r // 2]}/{ROWS[r % 2]}" for r in rows]
        return {"pooled": self.pooled[rows], "tokens": tokens, "mask": masks}, captions, sources
