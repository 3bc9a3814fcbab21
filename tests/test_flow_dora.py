"""DoRA (--use_lora --use_dora, or --lora_type dora) for the transformer families (SD3, FLUX.1, Lumina-2): the file
is diffusers' LoRA file with DoRA's magnitudes, the family's pipeline (`load_lora_weights`) reproduces the trained
transformer, and a resume is bitwise; LoHa/LoKr as peft adapter folders (resume bitwise, generate.py loads them);
kohya's FLUX layout has no DoRA, LoHa or LoKr."""

import os

import pytest
import torch
from conftest import run_main_in_process
from test_sd3 import lora_state, sd3_args

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "lumina2": "Lumina2Pipeline"}


@pytest.fixture(scope="module")
def pipelines(tiny_sd3_pipeline_dir, tiny_flux_pipeline_dir, tmp_path_factory):
    from utils.families.lumina2 import build_tiny_lumina2_pipeline

    return {"sd3": tiny_sd3_pipeline_dir, "flux": tiny_flux_pipeline_dir,
            "lumina2": build_tiny_lumina2_pipeline(str(tmp_path_factory.mktemp("tiny-lumina2")))}


def transformer_output(transformer, family, generator_seed=0):
    """The transformer's prediction on fixed random inputs of its family's shapes."""
    torch.manual_seed(generator_seed)
    config = transformer.config
    if family == "sd3":
        inputs = dict(hidden_states=torch.randn(1, config.in_channels, 8, 8),
                      encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim),
                      pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([500.0]))
    elif family == "flux":
        inputs = dict(hidden_states=torch.randn(1, 16, config.in_channels),
                      encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim),
                      pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([0.5]),
                      img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
                      guidance=torch.tensor([3.5]) if config.guidance_embeds else None)
    else:
        inputs = dict(hidden_states=torch.randn(1, config.in_channels, 8, 8), timestep=torch.tensor([0.5]),
                      encoder_hidden_states=torch.randn(1, 5, config.cap_feat_dim),
                      encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool))
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "lumina2"])
def test_dora_trains_saves_loads_in_diffusers_and_resumes_bitwise(family, pipelines, instance_dir, tmp_path):
    import argparse

    import diffusers

    import train_text_to_image as script
    from utils.families import family_for
    from utils.sd.lora import add_lora_adapter

    extra = ["--use_lora", "--use_dora", "--max_sequence_length", "16", "--learning_rate", "5e-2",
             "--checkpointing_steps", "2", "--lora_format", "diffusers" if family != "flux" else "both"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main_in_process(script, sd3_args(pipelines[family], instance_dir, straight, 4, extra))
    run_main_in_process(script, sd3_args(pipelines[family], instance_dir, split, 2, extra))
    run_main_in_process(script, sd3_args(pipelines[family], instance_dir, split, 4,
                                         extra + ["--resume_from_checkpoint", "latest"]))
    first, second = lora_state(straight), lora_state(split)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    magnitudes = [k for k in first if "lora_magnitude_vector" in k]
    assert magnitudes and all(k.startswith("transformer.") for k in magnitudes)
    assert not os.path.exists(straight / "pytorch_lora_weights_kohya.safetensors")  # (FLUX: no DoRA in kohya's)

    # diffusers' own loader against ours (the resume path) on the same base transformer: the same predictions,
    # and not the base model's (the adapter, magnitudes included, is in use).
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(pipelines[family])
    base = transformer_output(pipe.transformer, family)
    pipe.load_lora_weights(str(straight))
    theirs = transformer_output(pipe.transformer, family)
    ours_model = getattr(diffusers, PIPELINES[family]).from_pretrained(pipelines[family]).transformer
    settings = argparse.Namespace(rank=4, lora_alpha=None, lora_dropout=0.0, lora_type="lora", use_dora=True)
    add_lora_adapter(ours_model, settings, family_for(family).lora_targets(script.parse_args(
        sd3_args(pipelines[family], instance_dir, tmp_path / "x", 1, ["--use_lora"]))))
    family_for(family).load_lora_into(str(straight), ours_model, {})
    ours = transformer_output(ours_model, family)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family, kind", [("sd3", "loha"), ("flux", "lokr"), ("lumina2", "loha")])
def test_loha_lokr_train_save_peft_folders_resume_bitwise_and_load_in_generate(family, kind, pipelines, instance_dir,
                                                                              tmp_path):
    """--lora_type loha|lokr on a transformer family: the adapters are peft folders (transformer_adapter/, and the
    CLIPs' with --train_text_encoder for SD3), 4 steps straight = 2 + a resume to 4 (our loader restores them
    exactly), and generate.py's --lora loads the folder into the family's pipeline: its transformer predicts as the
    trained one (the same adapter through peft), not as the base."""
    import diffusers
    from safetensors.torch import load_file

    import generate
    import train_text_to_image as script

    extra = ["--use_lora", "--lora_type", kind, "--rank", "4", "--max_sequence_length", "16", "--learning_rate",
             "5e-2", "--checkpointing_steps", "2", *(["--train_text_encoder"] if family == "sd3" else [])]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main_in_process(script, sd3_args(pipelines[family], instance_dir, straight, 4, extra))
    run_main_in_process(script, sd3_args(pipelines[family], instance_dir, split, 2, extra))
    run_main_in_process(script, sd3_args(pipelines[family], instance_dir, split, 4,
                                         extra + ["--resume_from_checkpoint", "latest"]))
    folders = ["transformer_adapter"] + (["text_encoder_adapter", "text_encoder_2_adapter"] if family == "sd3" else [])
    for folder in folders:
        first, second = (load_file(d / folder / "adapter_model.safetensors") for d in (straight, split))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), folder
    marker = "hada_w1_a" if kind == "loha" else "lokr_w1"
    assert any(marker in k for k in load_file(straight / "transformer_adapter" / "adapter_model.safetensors"))
    assert not (straight / "pytorch_lora_weights.safetensors").exists()

    pipe_class = getattr(diffusers, PIPELINES[family])
    base = transformer_output(pipe_class.from_pretrained(pipelines[family]).transformer, family)
    loaded = pipe_class.from_pretrained(pipelines[family])
    generate.load_lora(loaded, str(straight))
    trained = pipe_class.from_pretrained(pipelines[family])
    from utils.sd.lycoris import load_peft_adapters

    load_peft_adapters(str(split), {"transformer": trained.transformer}, add=True)
    torch.testing.assert_close(transformer_output(loaded.transformer, family),
                               transformer_output(trained.transformer, family), rtol=0, atol=0)
    assert (transformer_output(loaded.transformer, family) - base).abs().max() > 1e-4


@pytest.mark.parametrize("extra, fragment", [
    (["--lora_type", "loha", "--lora_format", "kohya"], "--lora_format kohya with --lora_type loha is not available"),
    (["--use_dora", "--lora_format", "kohya"], "--lora_format kohya with DoRA is not available for"),
], ids=["loha_kohya", "dora_kohya"])
def test_what_stays_refused(pipelines, instance_dir, tmp_path, extra, fragment):
    import train_text_to_image as script
    from utils.errors import UserError

    with pytest.raises(UserError, match=fragment):
        script.parse_args(sd3_args(pipelines["flux"], instance_dir, tmp_path, 1, ["--use_lora", *extra]))
