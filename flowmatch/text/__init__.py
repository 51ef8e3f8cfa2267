"""Text encoders (CLIP text, T5 encoder, BERT-style such as MiniLM) from local directories, stacked as in SD3."""

from flowmatch.text.encoders import (
    MINILM,
    HFTextEncoder,
    TextEncoderError,
    TextEncoderStack,
    TextEncoding,
    build_text_encoders,
    minilm_path,
)

__all__ = ["MINILM", "HFTextEncoder", "TextEncoderError", "TextEncoderStack", "TextEncoding", "build_text_encoders", "minilm_path"]
