"""Build complete Stable Diffusion pipelines offline, from size presets.

Nothing here downloads: the UNet, VAE and CLIP text encoder come from configs, and the CLIP
tokenizer's vocabulary is generated (byte-level BPE, trained on a word corpus we pass in).
Used by the tests, the kanji demo (training from scratch) and the benchmarks. The result is
a normal diffusers folder: `StableDiffusionPipeline.from_pretrained(path)` loads it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

from utils.errors import UserError

def _small_unet(width: int) -> dict:
    """The small UNet at 16x16 latents: blocks (width, 2 width, 2 width), cross-attention at 8x8 and 4x4."""
    return dict(block_out_channels=(width, 2 * width, 2 * width), layers_per_block=1, cross_attention_dim=128,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=width // 2, norm_num_groups=width // 2)


PRESETS: dict[str, dict] = {
    # Test-sized: seconds per step on a CPU. VAE downsamples by 2.
    "tiny": {
        "unet": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=16),
        "vae": dict(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=16,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77),
        "num_merges": 300,
        "resolution": 32,
    },
    # SDXL-shaped at test size: two text encoders (CLIP + CLIP with projection, hidden states concatenated for
    # cross-attention: 32 + 48), the pooled prompt and the 6 time ids as added conditions ("text_time").
    "tiny-sdxl": {
        "unet": dict(block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=16,
                     addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True),
        "vae_from": "tiny",
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77),
        # A different width from the first encoder, as in SDXL (768 / 1280): diffusers' single-file loader tells
        # the two apart by it.
        "text_2": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                       max_position_embeddings=77, projection_dim=48, hidden_act="gelu"),
        "num_merges": 300,
        "resolution": 32,
    },
    # Trains in minutes on a 2-core CPU at 64px (the kanji demo's model before issue 17). VAE downsamples by 4.
    "small": {
        "unet": _small_unet(64),
        "vae": dict(block_out_channels=(32, 64, 64), latent_channels=4, norm_num_groups=32,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        "text": dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77),
        "num_merges": 2000,
        "resolution": 64,
    },
    # The kanji demo's model (issue 17): the small VAE, a UNet of half the small one's width (3x faster a
    # step, so 3x the steps in the demo's minutes: measured better at equal time), and a text pathway that
    # can carry the prompt.
    # Captions are short ("kanji meaning water, river": <= 16 tokens), so 16 positions, not 77: with 77 the
    # padding positions' hidden states (identical for every caption) made up most of what cross-attention
    # saw. Token embeddings start at std 1 instead of CLIP's 0.02 (position embeddings keep 0.02), so the
    # randomly initialised encoder's output at each position is dominated by which word is there.
    "kanji": {
        "unet": _small_unet(32),
        "text": dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=3,
                     max_position_embeddings=16),
        "token_embedding_std": 1.0,
        "vae_from": "small",
        "num_merges": 2000,
        "resolution": 64,
    },
    # Stable Diffusion 1.x-shaped (860M UNet, 83M VAE, CLIP ViT-L/14-sized text encoder): GPU runs and benchmarks.
    "base": {
        "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, norm_num_groups=32, layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77),
        "num_merges": 8000,
        "resolution": 512,
    },
}

# A default corpus so a tokenizer can be built with no data at all: common English words of
# the kind prompts are made of. Training data captions are added when available.
DEFAULT_CORPUS = """
a an the of and with in on at to for from by kanji meaning character sign symbol picture photo image drawing
water fire mountain river tree forest sun moon star sky cloud rain snow wind earth stone metal gold silver
person man woman child king mother father hand foot eye ear mouth heart mind head body life death
big small long short high low old new good bad red blue green white black yellow
one two three four five six seven eight nine ten hundred thousand day night year time
electric fish bird horse dog cat cow insect flower grass rice field house gate door road car ship
computer internet machine power light sound word language book write read speak say think know learn
go come walk run stop enter exit up down left right middle inside outside east west north south
""".split()

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def train_clip_bpe(texts, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-format BPE vocabulary (lower-cased words, `</w>` end-of-word marker).

    Returns (vocab token -> id, merges in order). Deterministic: ties break lexicographically.
    """
    byte_encoder = _bytes_to_unicode()
    word_counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            word_counts["".join(byte_encoder[b] for b in word.encode("utf-8"))] += 1
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in word_counts.items() if w}
    base = list(byte_encoder.values())
    vocab_tokens = base + [t + "</w>" for t in base]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        vocab_tokens.append(best[0] + best[1])
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    vocab_tokens += list(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def build_clip_tokenizer(output_dir: str, texts=None, num_merges: int = 2000, model_max_length: int = 77):
    """Write vocab.json/merges.txt for a CLIPTokenizer trained on `texts` (+ the default corpus)."""
    from transformers import CLIPTokenizer

    corpus = list(DEFAULT_CORPUS) + list(texts or [])
    vocab, merges = train_clip_bpe(corpus, num_merges)
    os.makedirs(output_dir, exist_ok=True)
    vocab_file, merges_file = os.path.join(output_dir, "vocab.json"), os.path.join(output_dir, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=model_max_length)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def _unigram_tokenizer(texts, vocab_size: int, special: list[str], unk: str):
    """A sentencepiece-style unigram `tokenizers.Tokenizer` trained on `texts` (+ the default corpus), specials first."""
    from tokenizers import SentencePieceUnigramTokenizer

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(list(DEFAULT_CORPUS) + list(texts or []), vocab_size=vocab_size,
                                special_tokens=special, unk_token=unk, show_progress=False)
    return unigram


def build_t5_tokenizer(output_dir: str, texts=None, vocab_size: int = 1000, model_max_length: int = 512):
    """A T5 tokenizer (sentencepiece-style unigram, <pad> 0, </s> 1, <unk> 2, </s> appended) trained with the
    `tokenizers` library on `texts` (+ the default corpus) and saved in `output_dir`: what the tiny SD3/FLUX
    pipelines' T5 reads, offline. Deterministic for the same texts."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    unigram = _unigram_tokenizer(texts, vocab_size, ["<pad>", "</s>", "<unk>"], "<unk>")
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0, model_max_length=model_max_length)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def build_gemma_tokenizer(output_dir: str, texts=None, vocab_size: int = 1000, model_max_length: int = 8192):
    """A Gemma-style tokenizer (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <bos> prepended) of the same kind, for the tiny
    Lumina-2 pipeline's Gemma-2 (the real one is Gemma's 256k sentencepiece vocabulary)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    unigram = _unigram_tokenizer(texts, vocab_size, ["<pad>", "<eos>", "<bos>", "<unk>"], "<unk>")
    unigram.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", model_max_length=model_max_length)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def tiny_clip_config(tokenizer, max_length: int = 77):
    """The CLIP text-encoder config of diffusers' SD3/FLUX pipeline tests (width 32, 5 layers, projection 32), sized
    to `tokenizer` (ids of its special tokens, its vocabulary)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=32,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                          pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_act="gelu",
                          projection_dim=32, max_position_embeddings=max_length)


def tiny_t5_encoder(tokenizer, seed: int = 0):
    """A T5 encoder sized as hf-internal-testing/tiny-random-t5 (width 32, 5 layers), for `tokenizer`."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5,
                                   relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=0))


def tiny_flow_vae(latent_channels: int, overrides: dict | None = None, seed: int = 0):
    """The one-level VAE of diffusers' SD3/FLUX/Lumina-2 pipeline tests (no downsampling, SD3's shift and scale)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                   scaling_factor=1.5035), **(overrides or {})})


def build_components(preset: str = "tiny", texts=None, resolution: int | None = None, seed: int = 0,
                     unet_config: dict | None = None, vae_config: dict | None = None, tokenizer=None,
                     tokenizer_dir: str | None = None, prediction_type: str = "epsilon"):
    """Fresh (randomly initialised) components of a Stable Diffusion pipeline.

    unet_config / vae_config override the preset's (keys of UNet2DConditionModel / AutoencoderKL).
    Returns a dict with unet, vae, text_encoder, tokenizer, scheduler.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise UserError(f"--model_preset {preset}: unknown preset; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    if "vae_from" in spec:
        spec = dict(spec, vae=PRESETS[spec["vae_from"]]["vae"])
    resolution = resolution or spec["resolution"]
    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = build_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tokenizer-"), texts, spec["num_merges"],
                                         model_max_length=spec["text"]["max_position_embeddings"])
    vae_kwargs = dict(spec["vae"], in_channels=3, out_channels=3, sample_size=resolution)
    vae_kwargs.update(vae_config or {})
    vae = AutoencoderKL(**vae_kwargs)
    latent_size = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec["text"])
    text_encoder = CLIPTextModel(text_config)
    extra = {}
    if "text_2" in spec:  # SDXL: a second encoder (with projection, for the pooled prompt) and its tokenizer
        from transformers import CLIPTextModelWithProjection

        extra["tokenizer_2"] = tokenizer
        extra["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **spec["text_2"]))
    if "token_embedding_std" in spec:
        with torch.no_grad():
            text_encoder.embeddings.token_embedding.weight.normal_(0.0, spec["token_embedding_std"])
    unet_kwargs = dict(spec["unet"], in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
                       sample_size=latent_size)
    unet_kwargs.update(unet_config or {})
    unet_kwargs["cross_attention_dim"] = text_config.hidden_size if unet_config is None or "cross_attention_dim" not in unet_config else unet_kwargs["cross_attention_dim"]
    if "text_2" in spec:  # SDXL: cross-attention over both encoders' hidden states; pooled prompt + 6 time ids
        unet_kwargs["cross_attention_dim"] = text_config.hidden_size + spec["text_2"]["hidden_size"]
        unet_kwargs["projection_class_embeddings_input_dim"] = (6 * spec["unet"]["addition_time_embed_dim"]
                                                                + spec["text_2"]["projection_dim"])
    unet = UNet2DConditionModel(**unet_kwargs)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, **extra)


def assemble_pipeline(components: dict):
    """A StableDiffusionPipeline, or a StableDiffusionXLPipeline when there is a text_encoder_2."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.get("text_encoder_2") is not None:
        return StableDiffusionXLPipeline(**components, add_watermarker=False)
    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_pipeline(output_dir: str, preset: str = "tiny", texts=None, resolution: int | None = None, seed: int = 0) -> str:
    """Write a complete, loadable StableDiffusionPipeline folder. Returns `output_dir`."""
    components = build_components(preset, texts=texts, resolution=resolution, seed=seed,
                                  tokenizer_dir=os.path.join(output_dir, "tokenizer"))
    assemble_pipeline(components).save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a randomly initialised Stable Diffusion pipeline folder, offline.")
    parser.add_argument("output_dir")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_pipeline(args.output_dir, args.preset, resolution=args.resolution, seed=args.seed)
    print(f"Wrote a '{args.preset}' Stable Diffusion pipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
