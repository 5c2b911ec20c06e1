"""LoRA per module group (vlmtrain.models.lora): config, gradients, merge, counts, stage outputs and their base
check, checkpoint sizes, QLoRA's refusal, and (slow) kill -9 / resume on 2 ranks with both engines."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from tests.test_model import make_sample, pack
from vlmtrain.config.load import ConfigError, shipped_stage_path, stage_config_from_dict, stage_config_to_dict
from vlmtrain.config.schema import LoraConfig
from vlmtrain.dist import DistContext
from vlmtrain.models.freeze import apply_trainability, trainability_rows
from vlmtrain.models.lora import (
    ADAPTERS_NAME,
    RECORD_NAME,
    TRAINED_NAME,
    LoraBase,
    LoraBaseMismatch,
    QuantizeUnsupported,
    adapter_parameters,
    load_base,
    lora_state,
    merge_lora,
)
from vlmtrain.models.vlm import WEIGHTS_NAME, VisionLanguageModel
from vlmtrain.train import checkpoint as ckpt
from vlmtrain.train.engines.base import EngineState
from vlmtrain.train.run import load_model_and_tokenizer
from vlmtrain.train.trainer import Trainer

WORLD_OF_ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LANGUAGE_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
VISION_TARGETS = ["q_proj", "v_proj", "fc2"]
VISION_LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": VISION_TARGETS}


def stage_dict(init_from: str | None = None, vision_lora: bool = True) -> dict:
    """Shipped stage 3 with LoRA on the LM (all-linear) and, optionally, the vision tower (a list of names)."""
    cfg = json.loads(shipped_stage_path(3).read_text())
    vision = (
        {"trainable": True, "lr": 1e-4, "lora": VISION_LORA} if vision_lora else {"trainable": False, "lr": 0}
    )
    cfg["modules"] = {
        "vision": vision,
        "projector": {"trainable": True, "lr": 1e-3},
        "language": {"trainable": True, "lr": 1e-3, "lora": LANGUAGE_LORA},
    }
    cfg["init_from"] = init_from
    return json.loads(json.dumps(cfg))  # a deep copy: tests mutate it


def perturb_adapters(model: nn.Module, seed: int = 0) -> None:
    """PEFT starts B at zero (the adapter adds nothing, A gets no gradient); random B makes every check bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def batch_for(model: VisionLanguageModel) -> dict:
    gen = torch.Generator().manual_seed(3)
    samples = [
        make_sample(model, gen, 9, True),
        make_sample(model, gen, 7, False),
        make_sample(model, gen, 6, True),
    ]
    return pack(samples, [[0, 1], [2]], length=40)


@pytest.fixture
def layered_model(tokenizer, tiny_model_config) -> VisionLanguageModel:
    """The tiny VLM reading the vision tower's second-to-last layer, so the last layer is never reached."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config, vision_feature_layer=-2)
    return VisionLanguageModel.from_config(cfg, tokenizer).eval()


# ---- config -----------------------------------------------------------------------------------------


def test_config_reads_lora_and_rejects_bad_values():
    cfg = stage_config_from_dict(stage_dict(), "s.json")
    assert cfg.modules["language"].lora == LoraConfig(8, 16.0, 0.0, "all-linear", None)
    assert cfg.modules["vision"].lora.target_modules == tuple(VISION_TARGETS)
    assert cfg.modules["projector"].lora is None and set(cfg.lora_groups) == {"vision", "language"}

    def error(mutate) -> str:
        data = stage_dict()
        mutate(data["modules"])
        with pytest.raises(ConfigError) as info:
            stage_config_from_dict(data, "s.json")
        return str(info.value)

    assert "modules.language.lora.rank: unknown key" in error(lambda m: m["language"]["lora"].update(rank=8))
    msg = error(lambda m: m["vision"].update(trainable=False, lr=0))
    assert "modules.vision.lora" in msg and "trainable: true" in msg
    assert "modules.language.lora.r: must be >= 1" in error(lambda m: m["language"]["lora"].update(r=0))
    assert "modules.language.lora.target_modules" in error(
        lambda m: m["language"]["lora"].update(target_modules="attention")
    )
    assert "modules.language.lora.quantize" in error(lambda m: m["language"]["lora"].update(quantize="8bit"))


# ---- gradients, merge, counts -------------------------------------------------------------------------


def test_gradients_reach_only_adapters_and_trainable_groups(layered_model):
    stage = stage_config_from_dict(stage_dict(), "s.json")
    apply_trainability(layered_model, stage.modules, seed=0)
    perturb_adapters(layered_model)
    layered_model.train()
    layered_model(**batch_for(layered_model), mask_mode="prefix").loss.backward()
    adapters = {id(p) for p in adapter_parameters(layered_model)}
    assert len(adapters) > 0
    n_adapter_grads = 0
    for name, p in layered_model.named_parameters():
        if id(p) in adapters:
            assert ".lora_" in name and p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, (
                name
            )
            n_adapter_grads += 1
        elif name.startswith("projector."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, f"{name}: base weight got a gradient"
    assert n_adapter_grads == len(adapters)
    # The vision tower's last layer feeds nothing (vision_feature_layer=-2): it gets no adapters at all.
    last = layered_model.vision.config.num_hidden_layers - 1
    assert not [
        n for n, _ in layered_model.named_parameters() if f"encoder.layers.{last}." in n and "lora_" in n
    ]


def test_merged_forward_equals_unmerged(layered_model):
    base_state = {k: v.clone() for k, v in layered_model.state_dict().items()}
    stage = stage_config_from_dict(stage_dict(), "s.json")
    apply_trainability(layered_model, stage.modules, seed=0)
    perturb_adapters(layered_model)
    batch = batch_for(layered_model)
    layered_model.eval()
    with torch.no_grad():
        unmerged = layered_model(**batch, mask_mode="prefix", return_logits=True).logits
        q = layered_model.language.model.layers[0].self_attn.q_proj
        a, b = q.lora_A["default"].weight.double(), q.lora_B["default"].weight.double()
        expected_q = q.base_layer.weight.double() + (b @ a) * (16 / 8)  # W + B A alpha / r, in float64
    assert merge_lora(layered_model) is layered_model and lora_state(layered_model) is None
    with torch.no_grad():
        merged = layered_model(**batch, mask_mode="prefix", return_logits=True).logits
    real = batch["sample_ids"] > 0
    assert torch.allclose(merged[real], unmerged[real], atol=1e-5, rtol=0)
    # The adapters changed the model (the comparison above can fail), and the merged layer is W + BA * scale.
    merge_lora(layered_model)  # idempotent
    assert not any(isinstance(m, BaseTunerLayer) for m in layered_model.modules())
    assert layered_model.state_dict().keys() == base_state.keys()
    q_name = "language.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(layered_model.state_dict()[q_name], base_state[q_name])
    torch.testing.assert_close(
        layered_model.language.model.layers[0].self_attn.q_proj.weight.double(), expected_q, atol=1e-6, rtol=0
    )


def brute_force_adapter_count(module: nn.Module, r: int, suffixes: list[str] | None, skip: set[str]) -> int:
    """r * (in + out) over the linear layers LoRA targets: all but the output head, or the named ones."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    total = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or sub is head or any(s in name for s in skip):
            continue
        if suffixes is None or name.split(".")[-1] in suffixes:
            total += r * (sub.in_features + sub.out_features)
    return total


def test_table_counts_adapters_as_peft_and_brute_force(layered_model):
    base_counts = {
        g: sum(p.numel() for p in m.parameters()) for g, m in layered_model.module_groups().items()
    }
    last = layered_model.vision.config.num_hidden_layers - 1
    expected = {
        "language": brute_force_adapter_count(layered_model.language, 8, None, set()),
        "vision": brute_force_adapter_count(layered_model.vision, 4, VISION_TARGETS, {f"encoder.layers.{last}."}),
        "projector": 0,
    }  # fmt: skip
    stage = stage_config_from_dict(stage_dict(), "s.json")
    apply_trainability(layered_model, stage.modules, seed=0)
    rows = {r[0]: r for r in trainability_rows(layered_model, stage.modules)}
    groups = layered_model.module_groups()
    for group, (_, status, params, trainable, adapters, lr) in rows.items():
        assert params == base_counts[group], group
        assert adapters == expected[group], group
        if group == "projector":
            assert status == "TRAINABLE" and trainable == params
        else:
            peft_count = sum(t.numel() for t in get_peft_model_state_dict(groups[group]).values())
            assert adapters == trainable == peft_count and status.startswith("LoRA r=")
        assert lr == stage.modules[group].lr
    assert expected["language"] > 0 and expected["vision"] > 0


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone(tokenizer, tiny_model_config):
    stage = stage_config_from_dict(stage_dict(vision_lora=False), "s.json")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VisionLanguageModel.from_config(tiny_model_config, tokenizer)
        before = torch.get_rng_state()
        apply_trainability(model, stage.modules, seed=5)
        assert torch.equal(torch.get_rng_state(), before)
        models.append({n: p for n, p in model.named_parameters() if ".lora_A." in n})
    assert models[0].keys() == models[1].keys() and models[0]
    assert all(torch.equal(models[0][n], models[1][n]) for n in models[0])  # every rank builds the same


# ---- stage outputs ----------------------------------------------------------------------------------


class GatheredState:
    """What `Trainer._write_output` reads of an engine: trainable parameters as full fp32 tensors, moments."""

    from vlmtrain.precision import PrecisionPolicy

    precision = PrecisionPolicy.for_precision("fp32")

    def __init__(self, model: nn.Module) -> None:
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def gather_state(self, moments: bool = True) -> EngineState:
        avg, avg_sq = ({n: torch.zeros_like(t) for n, t in self.params.items()} for _ in range(2))
        return EngineState(self.params, avg, avg_sq, optimizer_steps=1, scheduler_steps=1)


def write_lora_output(tmp_path: Path, tiny_model, tokenizer, vision_lora: bool = False):
    """A saved base folder, and a LoRA stage output trained (adapters perturbed) on it: (base, out, model)."""
    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tokenizer.save_pretrained(str(base))
    stage = stage_config_from_dict(stage_dict(init_from=str(base), vision_lora=vision_lora), "s.json")
    model = VisionLanguageModel.from_pretrained(base)
    block = stage_config_to_dict(stage)["model"]
    apply_trainability(model, stage.modules, stage.train.seed, LoraBase(str(base.resolve()), block, 0))
    perturb_adapters(model)
    with torch.no_grad():
        model.projector.linear_1.bias.add_(0.1)  # the trained group differs from the base's as well
    trainer = Trainer(stage, tmp_path / "run" / stage.name, WORLD_OF_ONE, model, tokenizer, lambda s: None, 1)
    out = trainer._write_output(GatheredState(model), trainer._frozen_originals())
    return base, out, model


def logits(model: VisionLanguageModel, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**batch, mask_mode="prefix", return_logits=True).logits
    return out[batch["sample_ids"] > 0]


def test_lora_output_holds_adapters_and_loads_as_base_plus_adapters(tmp_path, tiny_model, tokenizer):
    base, out, trained = write_lora_output(tmp_path, tiny_model, tokenizer)
    batch = batch_for(trained)
    expected = logits(trained, batch)
    assert not torch.allclose(expected, logits(tiny_model, batch), atol=1e-3)  # the adapters change the model

    assert not (out / WEIGHTS_NAME).exists()
    adapters, kept = load_file(str(out / ADAPTERS_NAME)), load_file(str(out / TRAINED_NAME))
    peft_sd = get_peft_model_state_dict(trained.language)
    assert adapters.keys() == {f"language.{k}" for k in peft_sd}
    assert kept.keys() == {n for n, _ in trained.projector.named_parameters(prefix="projector")}
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["base"]["init_from"] == str(base.resolve())
    assert record["base"]["fingerprint"] == lora_state(trained).fingerprint

    loaded = VisionLanguageModel.from_pretrained(out)  # eval, caption, export and init_from all load this way
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.modules())
    assert torch.allclose(logits(loaded, batch), expected, atol=1e-5, rtol=0)

    # A later stage naming the LoRA output as init_from gets base + adapters (merged), with the tokenizer.
    later = stage_config_from_dict(
        {**json.loads(shipped_stage_path(3).read_text()), "init_from": str(out)}, "x"
    )
    chained, tok = load_model_and_tokenizer(later, tmp_path)
    assert torch.allclose(logits(chained, batch), expected, atol=1e-5, rtol=0) and len(tok) == len(tokenizer)


def test_export_holds_the_merged_weights(tmp_path, tiny_model, tokenizer):
    """`vlmtrain export` of a LoRA output: LLaVA weights equal base + B A alpha/r (brute force), not the base."""
    from vlmtrain.export import export_hf, to_llava_state_dict

    _, out, trained = write_lora_output(tmp_path, tiny_model, tokenizer, vision_lora=True)
    layer = trained.language.model.layers[1].mlp.down_proj
    scale = 16 / 8
    with torch.no_grad():
        delta = (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()) * scale
        expected = (layer.base_layer.weight.double() + delta).float()
    from transformers import LlavaForConditionalGeneration

    exported = LlavaForConditionalGeneration.from_pretrained(
        str(export_hf(out, tmp_path / "hf"))
    ).state_dict()
    base = to_llava_state_dict(tiny_model)
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(exported[name], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(exported[name], base[name], atol=1e-4)
    projector = "model.multi_modal_projector.linear_1.bias"  # a fully trained group: the trained tensor
    torch.testing.assert_close(exported[projector], trained.projector.linear_1.bias.detach(), atol=0, rtol=0)
    frozen = "model.language_model.embed_tokens.weight"  # not targeted by all-linear: the base's, unchanged
    assert torch.equal(exported[frozen], base[frozen])


def test_loading_onto_a_changed_base_raises(tmp_path, tiny_model, tokenizer):
    base, out, _ = write_lora_output(tmp_path, tiny_model, tokenizer)
    with torch.no_grad():
        tiny_model.language.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of the base
    tiny_model.save_pretrained(base)
    with pytest.raises(LoraBaseMismatch, match="has changed") as info:
        VisionLanguageModel.from_pretrained(out)
    assert str(base.resolve()) in str(info.value)

    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match="base model is missing"):
        VisionLanguageModel.from_pretrained(out)


def test_moved_run_directory_finds_its_base(tmp_path, tiny_model, tokenizer):
    """The base is found relative to the output first: a run directory copied whole still loads."""
    _, out, trained = write_lora_output(tmp_path / "a", tiny_model, tokenizer)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    moved = tmp_path / "b" / out.relative_to(tmp_path / "a")
    batch = batch_for(trained)
    assert torch.allclose(
        logits(VisionLanguageModel.from_pretrained(moved), batch), logits(trained, batch), atol=1e-5
    )


def test_resuming_onto_a_changed_base_raises(tmp_path, tiny_model, tokenizer):
    stage = stage_config_from_dict(stage_dict(vision_lora=False), "s.json")
    state = apply_trainability(tiny_model, stage.modules, 0)
    trainer = Trainer(stage, tmp_path, WORLD_OF_ONE, tiny_model, tokenizer, lambda s: None, 1)
    trainer._check_resume_base({"lora_base_fingerprint": state.fingerprint}, tmp_path)  # the same base: fine
    with pytest.raises(LoraBaseMismatch, match="frozen LoRA base"):
        trainer._check_resume_base({"lora_base_fingerprint": "sha256:0"}, tmp_path)
    with pytest.raises(LoraBaseMismatch):  # a checkpoint of a full fine-tune is no LoRA checkpoint
        trainer._check_resume_base({}, tmp_path)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def test_checkpoint_size_next_to_a_full_stage3_checkpoint(tmp_path, tiny_model_config, tokenizer):
    """Stage output and resumable checkpoint of a LoRA stage 3 against the shipped (full) stage 3's."""
    sizes = {}
    full_stage = stage_config_from_dict(json.loads(shipped_stage_path(3).read_text()), "stage3.json")
    lora_stage = stage_config_from_dict(stage_dict(vision_lora=False), "s.json")
    counts = {}
    for name, stage in (("full", full_stage), ("lora", lora_stage)):
        torch.manual_seed(0)
        model = VisionLanguageModel.from_config(tiny_model_config, tokenizer)
        block = stage_config_to_dict(stage)["model"]
        apply_trainability(model, stage.modules, 0, LoraBase(None, block, 0))
        run = tmp_path / name
        trainer = Trainer(stage, run / stage.name, WORLD_OF_ONE, model, tokenizer, lambda s: None, 1)
        gathered = GatheredState(model)
        out = trainer._write_output(gathered, trainer._frozen_originals())
        step = ckpt.save_checkpoint(run / "ckpt", 1, gathered.gather_state(), {"reader": {}}, WORLD_OF_ONE, 1)
        sizes[name] = {"output": folder_bytes(out), "checkpoint": folder_bytes(step)}
        counts[name] = {
            "trainable": sum(t.numel() for t in gathered.params.values()),
            "all": sum(p.numel() for p in model.parameters()),
            "output_tensors": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        }
    n_lora, n_full = counts["lora"]["trainable"], counts["full"]["trainable"]
    # fp32 tensors: 4 bytes per stored value (+ small headers); the full output holds every parameter.
    assert counts["full"]["output_tensors"] >= 4 * counts["full"]["all"]
    assert 4 * n_lora <= counts["lora"]["output_tensors"] < 4 * n_lora + 64 * 1024
    ckpt_tensors = {k: 12 * counts[k]["trainable"] for k in counts}  # master + two AdamW moments
    assert (
        sizes["lora"]["checkpoint"] >= ckpt_tensors["lora"]
        and sizes["full"]["checkpoint"] >= ckpt_tensors["full"]
    )
    assert (
        sizes["lora"]["output"] < sizes["full"]["output"]
        and sizes["lora"]["checkpoint"] < sizes["full"]["checkpoint"]
    )
    print(f"\nLoRA sizes (tiny model, bytes): {json.dumps(sizes)}; trainable LoRA {n_lora} vs full {n_full}")


# ---- QLoRA ------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for devices without CUDA")
def test_quantize_without_cuda_is_refused_with_the_fix(tiny_model):
    data = stage_dict(vision_lora=False)
    data["modules"]["language"]["lora"] = {**LANGUAGE_LORA, "quantize": "4bit"}
    stage = stage_config_from_dict(data, "s.json")
    with pytest.raises(
        QuantizeUnsupported, match=r"modules\.language\.lora\.quantize='4bit' needs a CUDA GPU"
    ) as e:
        apply_trainability(tiny_model, stage.modules)
    assert "remove `quantize`" in str(e.value)
    assert lora_state(tiny_model) is None  # nothing attached
    data["modules"]["vision"] = {"trainable": True, "lr": 1e-4, "lora": {**VISION_LORA, "quantize": "4bit"}}
    with pytest.raises(QuantizeUnsupported, match="only the language group"):
        apply_trainability(tiny_model, stage_config_from_dict(data, "s.json").modules)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs CUDA and bitsandbytes",
)
def test_qlora_trains_adapters_on_a_4bit_base(tiny_model):
    import bitsandbytes as bnb

    data = stage_dict(vision_lora=False)
    data["modules"]["language"]["lora"] = {**LANGUAGE_LORA, "quantize": "4bit"}
    stage = stage_config_from_dict(data, "s.json")
    batch = {k: v.cuda() for k, v in batch_for(tiny_model).items()}
    tiny_model.cuda()
    with torch.no_grad():
        reference = tiny_model(**batch, mask_mode="prefix").loss.item()
    apply_trainability(tiny_model, stage.modules)
    q = tiny_model.language.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    tiny_model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tiny_model(**batch, mask_mode="prefix")
    out.loss.backward()
    # NF4 rounding moves the loss a little, not a lot (B = 0: the adapters add nothing yet).
    assert abs(out.loss.item() - reference) < 0.05 * abs(reference)
    adapters = {id(p) for p in adapter_parameters(tiny_model)}
    for name, p in tiny_model.named_parameters():
        if id(p) in adapters and ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif id(p) not in adapters and not name.startswith("projector."):
            assert p.grad is None, name


# ---- kill -9 and resume on 2 ranks (slow) -----------------------------------------------------------


def _lora_pair_config(data, engine: str) -> dict:
    from train_fixtures import two_rank_config

    cfg = two_rank_config(data)
    cfg["modules"] = {
        "vision": {"trainable": False, "lr": 0.0},
        "projector": {"trainable": True, "lr": 2e-3},
        "language": {"trainable": True, "lr": 1e-3, "lora": LANGUAGE_LORA},
    }
    cfg["train"]["engine"] = engine
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_sigkill_then_resume_reproduces_lora_run_bitwise(tmp_path_factory, tmp_path, engine):
    from train_fixtures import (
        PAIR_SAVE_EVERY,
        PAIR_STEPS,
        TrainProcess,
        assert_same_tensors,
        checkpoint_tensors,
        complete_checkpoints,
        read_metrics,
        reference_run,
        run_training,
        train_data,
    )

    data = train_data(tmp_path_factory.getbasetemp())
    ref = reference_run(
        tmp_path_factory.getbasetemp(), f"lora_{engine}_reference", _lora_pair_config(data, engine), 2
    )
    run = tmp_path / "run"
    metrics = run / "stage2" / "metrics.jsonl"
    job = TrainProcess.start([ref.config], run, ranks=2)
    job.wait_for_step(metrics, PAIR_SAVE_EVERY + 2)
    job.kill_all()
    assert job.wait() == -signal.SIGKILL
    done = complete_checkpoints(run / "stage2")
    assert done and done[-1] < PAIR_STEPS
    step_dir = run / "stage2" / "checkpoints" / f"step-{done[-1]:08d}"
    saved = checkpoint_tensors(step_dir)  # the sharded checkpoint's parameters, reassembled
    assert saved and all(".lora_" in n or n.startswith("projector.") for n in saved)  # no frozen base
    assert json.loads((step_dir / "trainer_state.json").read_text())["lora_base_fingerprint"].startswith(
        "sha256:"
    )

    run_training([ref.config], run, ranks=2, resume=True)
    ours, theirs = read_metrics(metrics), read_metrics(ref.stage_dir / "metrics.jsonl")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, PAIR_STEPS + 1))
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert a[key] == b[key], f"step {a['step']} (resumed at {done[-1]}): {key} {a[key]} != {b[key]}"
    assert theirs[-1]["loss"] < theirs[0]["loss"]  # the adapters learn
    for name in (ADAPTERS_NAME, TRAINED_NAME):
        assert_same_tensors(
            load_file(str(run / "stage2" / "final" / name)),
            load_file(str(ref.stage_dir / "final" / name)),
            name,
        )


@pytest.mark.slow
def test_later_stage_starts_from_base_plus_adapters(tmp_path_factory, tmp_path):
    """A stage with init_from a LoRA output trains on the merged model: with its LM frozen, the LM weights it
    writes out are exactly the LoRA output loaded and merged (and differ from the base's)."""
    from train_fixtures import (
        reference_run,
        run_training,
        tiny_stage_config,
        train_data,
        write_config,
    )

    data = train_data(tmp_path_factory.getbasetemp())
    ref = reference_run(
        tmp_path_factory.getbasetemp(), "lora_deepspeed_reference", _lora_pair_config(data, "deepspeed"), 2
    )
    lora_out = ref.stage_dir / "final"
    cfg = tiny_stage_config(1, data, max_steps=2, save_every=0, global_batch_size=4)  # projector only
    cfg.update(name="after_lora", init_from=str(lora_out), model={"attn_backend": "sdpa"})
    run_training([write_config(cfg, tmp_path / "after.json")], tmp_path / "run")
    written = load_file(str(tmp_path / "run" / "after_lora" / "final" / WEIGHTS_NAME))
    merged = VisionLanguageModel.from_pretrained(lora_out).state_dict()
    lm = [n for n in merged if n.startswith("language.") and n in written]
    assert len(lm) > 10
    for name in lm:
        assert torch.equal(written[name], merged[name]), name
    record = json.loads((lora_out / RECORD_NAME).read_text())
    assert record["base"]["init_from"] is None  # the base: built from `model` with the recorded seed
    q = "language.model.layers.0.self_attn.q_proj.weight"
    base = load_base(lora_out, record, None).state_dict()
    assert not torch.equal(base[q], merged[q])
