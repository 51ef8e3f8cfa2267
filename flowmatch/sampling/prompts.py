"""Prompts for text-to-image sampling: reading them, naming files after them, and encoding them into the
conditioning dict a text-conditioned network takes ({"pooled", "tokens", "mask"})."""

from __future__ import annotations

import re
from pathlib import Path

import torch


class PromptError(ValueError):
    """Prompts that cannot be used (a missing or empty prompts file, ...); the message names the file."""


def read_prompts(prompts: list[str] | None = None, prompts_file: str | None = None) -> list[str] | None:
    """The prompts of ``--prompts`` followed by those of ``--prompts_file`` (one per line, blank lines and
    surrounding whitespace dropped); None when neither is given."""
    if prompts is None and prompts_file is None:
        return None
    out = [str(p) for p in (prompts or [])]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise PromptError(f"prompts file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise PromptError(f"prompts file {path} is not UTF-8 text ({err})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise PromptError(f"prompts file {path} holds no prompts (one prompt per line; blank lines are skipped)")
        out += from_file
    if not out:
        raise PromptError("--prompts was given without any prompt")
    return out


def prompt_slug(prompt: str, max_chars: int = 40) -> str:
    """A file-name-safe short form of a prompt: lowercase ASCII letters, digits and '-', e.g. 'a thick three' -> 'a-thick-three'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_chars].rstrip("-") or "empty"


def encode_prompts(text_encoders, prompts: list[str], device: str | torch.device = "cpu") -> dict:
    """The conditioning dict of ``prompts`` (one row each) from a TextEncoderStack; a prompt longer than an
    encoder's max_length is truncated with a TextTruncationWarning naming it."""
    text_encoders.to(device)
    return text_encoders.encode(list(prompts)).as_cond()


def select(cond: dict, index: torch.Tensor) -> dict:
    """Rows ``index`` of every tensor in a conditioning dict."""
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
