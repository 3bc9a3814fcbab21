"""Loading a text encoder with its tokenizer, for every script that conditions on captions."""

from __future__ import annotations

import os


def load_text_encoder(path: str, clip_only: bool = False, frozen: bool = True):
    """(tokenizer, encoder) from a folder or Hub id; a pipeline folder's tokenizer/ and text_encoder/ too.

    clip_only: `CLIPTokenizer` + `CLIPTextModel`, what a `StableDiffusionPipeline` holds (text-to-image).
    Otherwise any of CLIP text towers, T5 encoders or an AutoModel (Gemma, ...), with `AutoTokenizer`
    (the mask DiT). frozen: requires_grad off and eval mode (caption encoders that only encode).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    tokenizer_path = encoder_path = path
    if os.path.isdir(os.path.join(path, "text_encoder")):
        tokenizer_path, encoder_path = os.path.join(path, "tokenizer"), os.path.join(path, "text_encoder")
    if clip_only:
        tokenizer, encoder = CLIPTokenizer.from_pretrained(tokenizer_path), CLIPTextModel.from_pretrained(encoder_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model_type = AutoConfig.from_pretrained(encoder_path).model_type
        if model_type in ("clip", "clip_text_model"):
            encoder = CLIPTextModel.from_pretrained(encoder_path)
        elif model_type in ("t5", "umt5", "mt5"):
            encoder = T5EncoderModel.from_pretrained(encoder_path)
        else:
            encoder = AutoModel.from_pretrained(encoder_path)
    if frozen:
        encoder.requires_grad_(False).eval()
    return tokenizer, encoder
