"""Vision towers by family (vlmtrain.models.backbones.vision) against transformers' own classes.

For a tiny checkpoint of every family (SigLIP, a full SigLIP with its text tower, CLIP, a full CLIP, DINOv2,
DINOv2 with registers): the family read from config.json, strict loading (every tensor equal to the saved one;
partial downloads and foreign checkpoints refused), the image preprocessing against transformers' image
processor, the features against the tower's own hidden states, the unused parameters against autograd, and a VLM
forward through save / load. Pixel shuffle against a brute-force loop over blocks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_language_config
from PIL import Image
from safetensors.torch import load_file, save_file
from vision_fixtures import CASES, build_model, save_tower, vision_part

from vlmtrain.config.schema import ModelConfig
from vlmtrain.data.image_transform import ImageTransform
from vlmtrain.models.backbones.vision import load_tower, spec_from_checkpoint, spec_from_dict
from vlmtrain.models.backbones.vision.siglip import SIGLIP
from vlmtrain.models.language import load_language_model
from vlmtrain.models.projector import pixel_shuffle
from vlmtrain.models.vlm import VisionLanguageModel

NAMES = list(CASES)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    return {name: save_tower(name, root / name) for name in NAMES}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(tiny_language_config(len(tokenizer)))
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    out = tmp_path_factory.mktemp("lm")
    lm.save_pretrained(str(out))
    return out


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def drop_layer(src: Path, dst: Path, pattern: str) -> list[str]:
    """Copy a checkpoint directory with every tensor whose name contains `pattern` deleted (a partial download)."""
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    dropped = [k for k in weights if pattern in k]
    assert dropped, pattern
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        str(dst / "model.safetensors"),
        {"format": "pt"},
    )
    return dropped


# ---- family detection and strict loading ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_family_is_read_from_config_and_every_tensor_loads(towers, name):
    case = CASES[name]
    spec, tower = load_tower(str(towers[name]))
    assert spec.family.name == case.family and type(tower).__name__ == case.model_class
    saved = vision_part(build_model(name)).state_dict()  # the same seed rebuilds the saved weights
    loaded = tower.state_dict()
    assert set(loaded) <= set(saved) and len(loaded) > 0
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_dinov2_loads_as_dinov2_never_as_siglip(towers):
    _, tower = load_tower(str(towers["dinov2"]))
    assert type(tower).__name__ == "Dinov2Model"
    # forcing it into SigLIP's class is refused (today's bug: every weight missing, the tower random)
    with pytest.raises(ValueError) as err:
        SIGLIP.load(str(towers["dinov2"]), "dinov2")
    msg = str(err.value)
    assert str(towers["dinov2"]) in msg and "'dinov2'" in msg and "missing keys" in msg
    assert "unexpected keys" in msg and "clip" in msg and "dinov2_with_registers" in msg


def test_unknown_model_type_names_the_directory_and_the_families(towers, tmp_path):
    bad = tmp_path / "vit"
    shutil.copytree(towers["dinov2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    with pytest.raises(ValueError) as err:
        load_tower(str(bad))
    msg = str(err.value)
    assert str(bad) in msg and "'vit'" in msg
    assert all(f in msg for f in ("siglip", "clip", "dinov2", "dinov2_with_registers"))


@pytest.mark.parametrize("name", ["siglip", "clip_full", "dinov2_reg"])
def test_a_tower_with_a_layer_deleted_is_refused(towers, tmp_path, name):
    pattern = "encoder.layer.1." if name.startswith("dinov2") else "encoder.layers.1."
    dropped = drop_layer(towers[name], tmp_path / "partial", pattern)
    with pytest.raises(ValueError) as err:
        load_tower(str(tmp_path / "partial"))
    msg = str(err.value)
    assert str(tmp_path / "partial") in msg and "missing keys" in msg and f"{len(dropped)} missing" in msg
    assert "supported" in msg.lower()


def test_a_language_model_with_a_layer_deleted_is_refused(lm_dir, tmp_path):
    dropped = drop_layer(lm_dir, tmp_path / "partial", "layers.1.")
    with pytest.raises(ValueError) as err:
        load_language_model(str(tmp_path / "partial"))
    msg = str(err.value)
    assert str(tmp_path / "partial") in msg and "'qwen2'" in msg and f"{len(dropped)} missing keys" in msg
    # the intact directory loads (the tied head is not stored and is no error), equal to what was saved
    lm = load_language_model(str(lm_dir))
    saved = load_file(str(lm_dir / "model.safetensors"))
    for key, value in saved.items():
        assert torch.equal(lm.state_dict()[key], value), key


def test_a_language_model_with_a_wrong_shape_is_refused(lm_dir, tmp_path):
    shutil.copytree(lm_dir, tmp_path / "bad")
    weights = load_file(str(lm_dir / "model.safetensors"))
    key = next(k for k in weights if k.endswith("layers.0.mlp.up_proj.weight"))
    weights[key] = torch.zeros(weights[key].shape[0] // 2, weights[key].shape[1])
    save_file(weights, str(tmp_path / "bad" / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match="wrong shape"):
        load_language_model(str(tmp_path / "bad"))


# ---- preprocessing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(50, 37), (37, 61), (300, 200)])
def test_preprocessing_of_the_checkpoint_equals_transformers_processor(towers, name, size):
    import transformers as tf

    transform = spec_from_checkpoint(str(towers[name])).transform
    assert transform.image_size == CASES[name].image_size
    processor = getattr(tf, CASES[name].processor_class).from_pretrained(str(towers[name]))
    img = random_image(size, seed=size[0])
    theirs = processor(img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(transform(img).numpy(), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "family, processor",
    [
        ("siglip", "SiglipImageProcessorPil"),
        ("clip", "CLIPImageProcessorPil"),
        ("dinov2", "BitImageProcessorPil"),
    ],
)
def test_family_defaults_equal_transformers_defaults_at_224(family, processor):
    """Without a preprocessor_config.json: the family's default at 224 px is transformers' default processor
    (for DINOv2: the released checkpoints' BitImageProcessor, shortest edge 256, crop 224, ImageNet)."""
    import transformers as tf

    spec = spec_from_dict({"model_type": family, "image_size": 224, "patch_size": 14})
    kwargs = {}
    if family == "siglip":
        kwargs = {"size": {"height": 224, "width": 224}}
    if family == "dinov2":
        kwargs = {
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "resample": 3,
        }
    theirs = getattr(tf, processor)(**kwargs)
    img = random_image((320, 241), seed=7)
    ref = theirs(img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(spec.transform(img).numpy(), ref, rtol=0, atol=1e-5)


def test_bad_preprocessor_configs_are_errors_naming_the_file():
    default = ImageTransform(32)
    with pytest.raises(ValueError, match=r"x\.json.*not square"):
        ImageTransform.from_preprocessor_config({"size": {"height": 32, "width": 48}}, "x.json", default)
    with pytest.raises(ValueError, match=r"x\.json.*rescale"):
        ImageTransform.from_preprocessor_config({"rescale_factor": 1.0}, "x.json", default)
    with pytest.raises(ValueError, match=r"x\.json.*do_resize"):
        ImageTransform.from_preprocessor_config({"do_resize": False}, "x.json", default)
    t = ImageTransform(24, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), Image.Resampling.BILINEAR, 28)
    assert ImageTransform.from_dict(json.loads(json.dumps(t.to_dict()))) == t


# ---- features, tokens, unused parameters ----------------------------------------------------------------
def vlm_for(towers, lm_dir, tokenizer, name, **model_kw) -> VisionLanguageModel:
    cfg = ModelConfig(vision=str(towers[name]), language=str(lm_dir), **model_kw)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(cfg, tokenizer)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layer", [None, 1])
def test_features_are_the_towers_hidden_states_without_leading_tokens(towers, lm_dir, tokenizer, name, layer):
    case = CASES[name]
    model = vlm_for(towers, lm_dir, tokenizer, name, vision_feature_layer=layer).eval()
    expected_layer = case.default_layer if layer is None else layer
    assert model.vision_feature_layer == expected_layer
    assert (model.vision_skip_tokens, model.num_image_tokens, model.image_size) == (
        case.skip,
        case.patches,
        case.image_size,
    )
    pixels = torch.randn(2, 3, case.image_size, case.image_size)
    with torch.no_grad():
        hidden = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert hidden[expected_layer].shape[1] == case.skip + case.patches
        feats = model.vision_family.features(model.vision, pixels, model.vision_feature_layer)
        torch.testing.assert_close(feats, hidden[expected_layer][:, case.skip :], rtol=0, atol=0)
        projected = model.encode_images(pixels)
    assert projected.shape == (2, case.patches, model.language.config.hidden_size)


def image_batch(model: VisionLanguageModel, n_text: int = 6, images: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    p = model.num_image_tokens
    ids = torch.randint(10, 300, (images, p + n_text), generator=gen)
    ids[:, :p] = model.image_token_id
    labels = ids.clone()
    labels[:, :p] = -100
    flags = torch.zeros_like(ids, dtype=torch.bool)
    flags[:, :p] = True
    size = model.image_size
    return {
        "input_ids": ids,
        "labels": labels,
        "image_flags": flags,
        "sample_ids": torch.ones_like(ids),
        "pixel_values": torch.randn(images, 3, size, size, generator=gen),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layer", [None, -2, 0])
def test_exactly_the_declared_unused_parameters_get_no_gradient(towers, lm_dir, tokenizer, name, layer):
    model = vlm_for(towers, lm_dir, tokenizer, name, vision_feature_layer=layer).train()
    model.requires_grad_(True)
    model(**image_batch(model), mask_mode="prefix").loss_sum.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    ids = {id(p) for p in model.unused_parameters()}
    declared = {n for n, p in model.named_parameters() if id(p) in ids}
    assert no_grad == declared
    n_layers = model.vision.config.num_hidden_layers
    used = model.vision_feature_layer % (n_layers + 1)
    # by hand: the family's after-the-encoder modules, and every layer past the feature layer
    prefix = "vision.encoder.layer." if CASES[name].family.startswith("dinov2") else "vision.encoder.layers."
    past = {n for n in declared if n.startswith(prefix)}
    assert {int(n[len(prefix) :].split(".")[0]) for n in past} == set(range(used, n_layers))
    rest = {n.split(".")[1] if n.count(".") > 1 else n for n in declared - past}
    expected_rest = {"siglip": {"post_layernorm"}, "clip": {"post_layernorm"}}.get(
        CASES[name].family, {"layernorm", "embeddings"}
    )
    assert rest == expected_rest


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 2])
def test_forward_and_save_load_round_trip(towers, lm_dir, tokenizer, name, k, tmp_path):
    case = CASES[name]
    model = vlm_for(towers, lm_dir, tokenizer, name, pixel_shuffle=k).eval()
    assert model.num_image_tokens == case.patches // (k * k)
    assert model.projector.linear_1.in_features == 32 * k * k
    batch = image_batch(model)
    with torch.no_grad():
        out = model(**batch, mask_mode="prefix", return_logits=True)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "vlm_config.json").read_text())
    assert saved["vision_family"] == case.family and saved["vision_skip_tokens"] == case.skip
    assert saved["pixel_shuffle"] == k and saved["vision_config"]["model_type"] in (
        case.family,
        f"{case.family}_vision_model",
    )
    assert saved["image_preprocessing"] == spec_from_checkpoint(str(towers[name])).transform.to_dict()
    again = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert again.image_transform == model.image_transform and again.vision_family is model.vision_family
    with torch.no_grad():
        out2 = again(**batch, mask_mode="prefix", return_logits=True)
    assert torch.equal(out.logits, out2.logits)


# ---- pixel shuffle --------------------------------------------------------------------------------------
@pytest.mark.parametrize("s, k", [(4, 1), (4, 2), (6, 2), (6, 3), (6, 6)])
def test_pixel_shuffle_equals_a_loop_over_blocks(s, k):
    n, d = 2, 5
    x = torch.randn(n, s * s, d)
    out = pixel_shuffle(x, k)
    g = s // k
    ref = torch.empty(n, g * g, k * k * d)
    for b in range(n):
        for i in range(g):
            for j in range(g):
                parts = [x[b, (i * k + di) * s + (j * k + dj)] for di in range(k) for dj in range(k)]
                ref[b, i * g + j] = torch.cat(parts)
    assert torch.equal(out, ref)


def test_pixel_shuffle_that_does_not_divide_the_grid_is_an_error(towers, lm_dir, tokenizer):
    with pytest.raises(ValueError, match=r"pixel_shuffle=3 does not divide the 4 x 4 patch grid"):
        vlm_for(towers, lm_dir, tokenizer, "siglip", pixel_shuffle=3)
    with pytest.raises(ValueError, match="pixel_shuffle=4 does not divide the 6 x 6"):
        pixel_shuffle(torch.zeros(1, 36, 2), 4)


# ---- plan, init check and checkpoints written before families -------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_plan_reads_a_local_tower_directory_without_weights(towers, lm_dir, name):
    from vlmtrain.train.plan import meta_model

    vlm = meta_model(ModelConfig(vision=str(towers[name]), language=str(lm_dir)))
    case = CASES[name]
    assert (vlm.vision_family.name, vlm.num_image_tokens, vlm.vision_skip_tokens) == (
        case.family,
        case.patches,
        case.skip,
    )
    assert vlm.image_transform == spec_from_checkpoint(str(towers[name])).transform
    assert next(vlm.vision.parameters()).device.type == "meta"


def test_init_check_compares_vision_configs_as_their_familys_architecture():
    from vlmtrain.train.init_check import _config_lines

    dino = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    built = spec_from_dict(dino).config.to_dict()  # what a checkpoint's vlm_config.json records
    assert _config_lines("vision_config", dino, built) == []
    lines = _config_lines("vision_config", {**dino, "num_hidden_layers": 3}, built)
    # (DINOv2's backbone entries out_features / out_indices / stage_names follow the layer count)
    assert "model.vision_config.num_hidden_layers: 3 here, 2 in the checkpoint" in lines
    clip = _config_lines("vision_config", {**dino, "model_type": "clip"}, built)
    assert any(line.startswith("model.vision_config.model_type:") for line in clip)


def test_a_checkpoint_written_before_families_loads_as_siglip(tiny_model, tmp_path):
    """vlm_config.json without vision_family / image_preprocessing / pixel_shuffle: SigLIP and its defaults."""
    tiny_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "vlm_config.json"
    cfg = json.loads(path.read_text())
    for key in ("vision_family", "vision_skip_tokens", "image_preprocessing", "pixel_shuffle"):
        cfg.pop(key)
    cfg["projector"].pop("pixel_shuffle")
    path.write_text(json.dumps(cfg))
    old = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert old.vision_family.name == "siglip" and old.pixel_shuffle == 1
    assert old.image_transform == ImageTransform(32)  # SigLIP's: exact resize, mean = std = 0.5, bicubic
    for (n, p), (_, q) in zip(old.state_dict().items(), tiny_model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_preflight_names_a_tower_directory_of_no_supported_family(towers, tmp_path):
    from vlmtrain.train.preflight import ModelSource, check_model_sources

    bad = tmp_path / "vit"
    shutil.copytree(towers["clip"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    files = (("config.json",), ("model.safetensors",))
    problems, hub = check_model_sources(
        [
            ModelSource("s model.vision", str(bad), files),
            ModelSource("s model.vision", str(towers["clip"]), files),
        ]
    )
    assert hub == [] and len(problems) == 1
    assert (
        problems[0].where == "s model.vision"
        and "'vit'" in problems[0].message
        and str(bad) in problems[0].message
    )
