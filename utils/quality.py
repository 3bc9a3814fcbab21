"""Sample-quality numbers at validation (`--validation_metrics clip_score,fid,kid`): CLIP score (how well an image
matches its prompt) and FID / KID (how the generated images' distribution compares with held-out real images),
computed by torchmetrics (CLIPScore, FrechetInceptionDistance, KernelInceptionDistance), not by hand.

Feature extractors: CLIP score uses `--metrics_clip_model` (a CLIP checkpoint folder or Hub id; torchmetrics'
default openai/clip-vit-large-patch14). FID and KID use torchmetrics' standard one, torch-fidelity's InceptionV3
2048-d pool features (the numbers papers report), unless `--metrics_feature_extractor` names a TorchScript module
(uint8 images [N, 3, H, W] -> features [N, D]) for machines without torch-fidelity or its weights, or for a domain's
own features; the run logs which extractor it used. What cannot be built (no torch-fidelity, no weights, no network)
is said once, and the run continues with the metrics it can compute.
"""

from __future__ import annotations

import logging

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

METRICS = ("clip_score", "fid", "kid")
HIGHER_IS_BETTER = {"val/clip_score"}


def add_quality_args(parser) -> None:
    parser.add_argument("--validation_metrics", type=str, default=None,
                        help=f"Comma-separated sample-quality metrics computed at each validation on the held-out "
                             f"prompts/images (--validation_split): {', '.join(METRICS)}; logged as val/<name>.")
    parser.add_argument("--metrics_clip_model", type=str, default="openai/clip-vit-large-patch14",
                        help="CLIP model (folder or Hub id) for val/clip_score (torchmetrics' default).")
    parser.add_argument("--metrics_num_samples", type=int, default=50,
                        help="Held-out rows scored by --validation_metrics (one sample of each caption).")
    parser.add_argument("--early_stopping_metric", type=str, default="val/loss",
                        choices=["val/loss"] + [f"val/{name}" for name in METRICS],
                        help="The held-out number best/ and --early_stopping_patience follow (val/clip_score: "
                             "higher is better; the others lower).")
    parser.add_argument("--metrics_feature_extractor", type=str, default=None,
                        help="TorchScript file of a feature extractor for val/fid and val/kid (uint8 [N,3,H,W] -> "
                             "[N,D]); default: torch-fidelity's InceptionV3 2048-d features, the standard ones.")


def parse_metrics(value: str | None) -> list[str]:
    """--validation_metrics as a list; an unknown name is a one-block error."""
    names = [name.strip() for name in (value or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UserError(f"--validation_metrics {value}: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}.")
    return names


def check_quality_args(args) -> None:
    """--validation_metrics needs held-out data; --early_stopping_metric one of the numbers the run computes."""
    names = parse_metrics(args.validation_metrics)
    if names and not args.validation_split:
        raise UserError("--validation_metrics scores samples of held-out captions against the held-out images: add "
                        "--validation_split (a fraction such as 0.05, or a held-out folder).")
    if args.early_stopping_metric != "val/loss" and args.early_stopping_metric[4:] not in names:
        raise UserError(f"--early_stopping_metric {args.early_stopping_metric}: add {args.early_stopping_metric[4:]} "
                        "to --validation_metrics, or follow val/loss.")
    if args.metrics_num_samples < 2:
        raise UserError(f"--metrics_num_samples {args.metrics_num_samples}: FID and KID need at least 2 samples.")


def quality_for(args) -> "QualityMetrics | None":
    """The run's QualityMetrics (None without --validation_metrics); the extractor it uses is logged."""
    names = parse_metrics(args.validation_metrics)
    if not names:
        return None
    quality = QualityMetrics(names, args.metrics_clip_model, args.metrics_feature_extractor)
    logger.info(f"--validation_metrics {','.join(names)}: CLIP {args.metrics_clip_model}; FID/KID features: "
                f"{quality.extractor}")
    return quality


def load_feature_extractor(path: str) -> torch.nn.Module:
    """A TorchScript feature extractor, with the `num_features` torchmetrics reads (from one dummy image)."""
    try:
        module = torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as error:
        raise UserError(f"--metrics_feature_extractor {path}: not a TorchScript file ({error}); save one with "
                        "torch.jit.script(model).save(path).") from None
    wrapper = _Features(module)
    with torch.no_grad():
        wrapper.num_features = int(module(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[-1])
    return wrapper


class _Features(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, images):
        return self.module(images)


class _ClipFeatures(torch.nn.Module):
    """A CLIPModel whose get_image/text_features return the embedding tensors (transformers 5 returns an output
    object where torchmetrics 1.9 expects the tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(output):
    return output if torch.is_tensor(output) else output.pooler_output


class QualityMetrics:
    """`metrics(generated, prompts, real)`: {"val/clip_score", "val/fid", "val/kid", "val/kid_std"} (those asked for and
    available) for uint8 image batches [N, 3, H, W] (generated, with their prompts) and [M, 3, H, W] (real)."""

    def __init__(self, names: list[str], clip_model: str, feature_extractor: str | None):
        self.names, self.clip_model = list(names), clip_model
        self.features = load_feature_extractor(feature_extractor) if feature_extractor else None
        self.extractor = (f"TorchScript {feature_extractor}" if feature_extractor
                          else "torch-fidelity InceptionV3 (2048-d pool features)")
        self.said = set()

    def unavailable(self, name: str, error: Exception) -> None:
        if name not in self.said:
            self.said.add(name)
            logger.warning(f"val/{name} is not computed: {type(error).__name__}: {str(error)[:300]} (needs torch-fidelity "
                           "and its InceptionV3 weights, or --metrics_feature_extractor; the other metrics go on)"
                           if name != "clip_score" else
                           f"val/clip_score is not computed: {type(error).__name__}: {str(error)[:300]} "
                           f"(--metrics_clip_model {self.clip_model}; the other metrics go on)")
            self.names = [n for n in self.names if n != name]

    def on_main_process(self, accelerator, samples) -> dict:
        """The metrics of `samples()` -> (generated, prompts, real), computed on the main process only (it samples);
        every rank gets the numbers (early stopping may read them)."""
        from accelerate.utils import broadcast_object_list

        results = [self(*samples()) if accelerator.is_main_process else None]
        broadcast_object_list(results)
        return results[0]

    def __call__(self, generated: torch.Tensor, prompts: list[str], real: torch.Tensor) -> dict:
        results = {}
        for name in list(self.names):
            try:
                results.update(getattr(self, name)(generated, prompts, real))
            except (ImportError, ModuleNotFoundError, OSError, RuntimeError, ValueError) as error:
                self.unavailable(name, error)
        return results

    def clip_score(self, generated, prompts, real) -> dict:
        from torchmetrics.multimodal.clip_score import CLIPScore

        from transformers import CLIPModel, CLIPProcessor

        # (a loader, not the name: torchmetrics takes only its listed Hub ids by name; any CLIP folder or id here)
        metric = CLIPScore(model_name_or_path=lambda: (_ClipFeatures(CLIPModel.from_pretrained(self.clip_model)),
                                                       CLIPProcessor.from_pretrained(self.clip_model)))
        metric.update(generated, prompts)
        return {"val/clip_score": float(metric.compute())}

    def extractor_for(self, metric_class, **kwargs):
        feature = self.features if self.features is not None else 2048
        return metric_class(feature=feature, **kwargs)

    def fid(self, generated, prompts, real) -> dict:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = self.extractor_for(FrechetInceptionDistance)
        metric.update(real, real=True)
        metric.update(generated, real=False)
        return {"val/fid": float(metric.compute())}

    def kid(self, generated, prompts, real) -> dict:
        from torchmetrics.image.kid import KernelInceptionDistance

        metric = self.extractor_for(KernelInceptionDistance, subset_size=min(50, len(generated), len(real)))
        metric.update(real, real=True)
        metric.update(generated, real=False)
        mean, std = metric.compute()
        return {"val/kid": float(mean), "val/kid_std": float(std)}


def to_uint8(images) -> torch.Tensor:
    """PIL images or float tensors in [-1, 1] [N, 3, H, W] -> uint8 [N, 3, H, W]."""
    import numpy as np

    if torch.is_tensor(images):
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return torch.stack([torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1) for image in images])
