"""The model core: one config, shared blocks, one transformer for every family.

Plain PyTorch, one forward path per block type; it imports nothing from lmforge but the error type.
Stored-weight formats and CPU acceleration are installed into a built model from outside (`lmforge.quant`).
Encoder-decoders (T5) are `EncoderDecoder`s of the same blocks; `make_model` builds whichever a config names.
"""

from .config import ModelConfig
from .seq2seq import EncoderDecoder
from .transformer import Transformer


def make_model(cfg: ModelConfig) -> Transformer | EncoderDecoder:
    """The model a config describes: an `EncoderDecoder` when it has a decoder stack, else a `Transformer`."""
    return EncoderDecoder(cfg) if cfg.decoder_layers else Transformer(cfg)


__all__ = ["EncoderDecoder", "ModelConfig", "Transformer", "make_model"]
