"""The mask-conditioned NextDiT: model, flow matching, paired data, caches, pipeline, metrics."""
