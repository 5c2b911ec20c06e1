"""Stage configs: the shipped presets match the paper's Table V, and malformed configs are rejected clearly."""

from __future__ import annotations

import json

import pytest

from vlmtrain.config import ConfigError, load_stage_config, stage_config_from_dict
from vlmtrain.config.load import read_json, shipped_stage_path

# Table V and section III-D of the paper.
PAPER = {
    0: ({"vision": 0, "projector": 1e-3, "language": 0}, "bidirectional", 0.2, "COCO-118k-Recap", None),
    1: ({"vision": 0, "projector": 1e-3, "language": 0}, "prefix", 0.0, "COCO-118k-Recap", "stage0"),
    2: ({"vision": 5e-6, "projector": 2e-3, "language": 2e-5}, "prefix", 0.0, "BLIP558k-Recap", "stage1"),
    3: ({"vision": 5e-6, "projector": 1e-4, "language": 2e-5}, "prefix", 0.0, "LLaVA-Next-790k", "stage2"),
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_stage_matches_paper(stage):
    cfg = load_stage_config(stage)
    lrs, mode, noise, dataset, init_from = PAPER[stage]
    assert {g: m.lr for g, m in cfg.modules.items()} == lrs
    assert {g: m.trainable for g, m in cfg.modules.items()} == {g: lr > 0 for g, lr in lrs.items()}
    assert (cfg.mask.mode, cfg.mask.noise_ratio, cfg.data.dataset, cfg.init_from) == (
        mode,
        noise,
        dataset,
        init_from,
    )
    assert cfg.batch.global_batch_size == 128 and cfg.train.epochs == 1
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.01 and cfg.optim.min_lr == 1e-8
    assert cfg.optim.grad_clip > 0 and cfg.train.gradient_checkpointing and cfg.model.attn_backend == "auto"


def base() -> dict:
    return read_json(shipped_stage_path(2))


def mutate(path: str, value) -> dict:
    data = base()
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (mutate("optim.weight_decy", 0.1), r"optim\.weight_decy: unknown key; did you mean 'weight_decay'"),
        (mutate("trian", {}), r"trian: unknown key; did you mean 'train'"),
        (
            mutate("modules.visoin", {"trainable": True, "lr": 1e-5}),
            r"modules\.visoin: unknown module group; did you mean 'vision'",
        ),
        (mutate("modules.vision.lr", -1e-5), r"modules\.vision\.lr: learning rate must be >= 0"),
        (mutate("modules.vision.lr", "fast"), r"modules\.vision\.lr: expected a number"),
        (mutate("modules.projector.trainable", "yes"), r"modules\.projector\.trainable: expected bool"),
        (mutate("mask.noise_ratio", 1.5), r"mask\.noise_ratio: must be in \[0, 1\]"),
        (mutate("mask.mode", "full"), r"mask\.mode: 'full' is not one of"),
        (
            mutate("batch.micro_batch_size", 7),
            r"batch\.global_batch_size: 128 is not divisible by micro_batch_size 7",
        ),
        (mutate("optim.betas", [0.9]), r"optim\.betas: expected a list of 2 values"),
        (
            mutate("modules.language", {"trainable": False, "lr": 1e-5}),
            r"modules\.language\.lr: a frozen group must have lr 0",
        ),
        (
            mutate("modules.language", {"trainable": True, "lr": 0}),
            r"modules\.language\.lr: a trainable group needs lr > 0",
        ),
        (mutate("data.pack_length", 16), r"data\.pack_length: must be >= max_length"),
        (mutate("model.vision_config", {"hidden_size": 8}), r"model\.vision: give exactly one of"),
    ],
)
def test_malformed_configs_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        stage_config_from_dict(data, source="my_stage.json")


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mutate("optim.lr", 1)))
    with pytest.raises(ConfigError, match=r"bad\.json: optim\.lr: unknown key"):
        load_stage_config(config=path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON \(line 1"):
        load_stage_config(config=path)


def test_missing_module_group_is_rejected():
    data = base()
    del data["modules"]["projector"]
    with pytest.raises(ConfigError, match=r"modules: missing module group\(s\) \['projector'\]"):
        stage_config_from_dict(data)


def test_user_recipe_with_five_stages_needs_no_code(tmp_path):
    """A new stage is just a JSON file: e.g. a stage 4 that tunes only the LM at a lower LR."""
    data = base()
    data.update(name="stage4", init_from="stage3")
    data["modules"] = {
        "vision": {"trainable": False, "lr": 0},
        "projector": {"trainable": False, "lr": 0},
        "language": {"trainable": True, "lr": 5e-6},
    }
    path = tmp_path / "stage4.json"
    path.write_text(json.dumps(data))
    cfg = load_stage_config(config=path, overrides=["mask.mode=causal", "batch.micro_batch_size=4"])
    assert cfg.trainable_groups == ("language",)
    assert cfg.mask.mode == "causal" and cfg.batch.micro_batch_size == 4


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match=r"mask\.noise_ratio: must be in"):
        load_stage_config(0, overrides=["mask.noise_ratio=2"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_stage_config(0, overrides=["mask.noise_ratio"])


def test_unknown_stage_lists_shipped_ones():
    with pytest.raises(ConfigError, match="shipped: stage0, stage1, stage2, stage3"):
        load_stage_config(9)
