"""Real-size vision towers of every family, random weights: parameters, image tokens, CPU forward+backward memory.

    PYTHONPATH=. python benchmarks/bench_vision_families.py [--no-memory]

Parameters and token counts come from the meta-device build (`vlmtrain plan`'s shapes: plan.KNOWN_VISION). The
memory column runs each tower in its own subprocess: random fp32 weights on the CPU, one image at batch 1, the
features through the projector (to Qwen2.5-0.5B's width 896), sum().backward() with everything trainable, and
reports the peak resident set size above the process's size after building the model: the fp32 gradient of
every parameter (4 bytes each) plus the activations and autograd buffers, not the weights. fp32 on a CPU; bf16
activations on a GPU are half of theirs.

Measured on the 2-core CPU (torch 2.13, transformers 5.25), MiB above the built model / seconds of fwd+bwd:
SigLIP2-so400m/14-224 2,238 / 38.5; CLIP-L/14-336 1,928 / 48.2; DINOv2-L 1,513 / 24.6; DINOv2-L-reg 1,491 / 33.0.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TOWERS = (
    "google/siglip2-so400m-patch14-224",
    "openai/clip-vit-large-patch14-336",
    "facebook/dinov2-large",
    "facebook/dinov2-with-registers-large",
)


def shapes(vision: str) -> dict:
    import dataclasses

    from vlmtrain.config.load import load_stage_config
    from vlmtrain.train.flops import ModelShape
    from vlmtrain.train.plan import meta_model

    model = dataclasses.replace(load_stage_config(stage=2).model, vision=vision)
    vlm = meta_model(model)
    shape = ModelShape.from_model(vlm)
    return {
        "tower": vision,
        "family": vlm.vision_family.name,
        "params": sum(p.numel() for p in vlm.vision.parameters()),
        "unused": sum(p.numel() for p in vlm.unused_parameters()),
        "projector": sum(p.numel() for p in vlm.projector.parameters()),
        "image_size": vlm.image_size,
        "image_tokens": vlm.num_image_tokens,
        "tower_tokens": shape.vision_tokens,
        "feature_layer": vlm.vision_feature_layer,
    }


def measure(vision: str) -> dict:
    """Run in a child process: build the tower at real size with random weights, one fwd+bwd at batch 1."""
    import dataclasses

    import torch

    from vlmtrain.config.load import load_stage_config
    from vlmtrain.models.projector import Projector
    from vlmtrain.train.plan import vision_spec

    torch.manual_seed(0)
    spec = vision_spec(dataclasses.replace(load_stage_config(stage=2).model, vision=vision))
    tower = spec.family.build(spec.config).train()
    projector = Projector(spec.family.hidden_size(spec.config), 896)
    size = spec.transform.image_size
    pixels = torch.randn(1, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    feats = spec.family.features(tower, pixels, spec.family.default_feature_layer)
    projector(feats).float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"fwd_bwd_mib": (peak - before) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    for vision in TOWERS:
        row = shapes(vision)
        if not args.no_memory:
            out = subprocess.run(
                [sys.executable, __file__, "--child", vision], capture_output=True, text=True, check=True
            )
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(row))


if __name__ == "__main__":
    main()
