"""Numerics at the scale the recipe runs at, checked on tiny models: the gradient an optimizer step applies
is the token mean of the whole global batch whatever the layout, gradients accumulate in fp32, masters are
fp32 whatever a checkpoint's dtype, and the precision policy is the one DeepSpeed is configured with."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from numerics_fixtures import collate, make_samples, row_length_for, stage_for
from safetensors.torch import load_file
from train_fixtures import PYTHON, train_env

from vlmtrain.config.load import shipped_stage_path
from vlmtrain.data.collate import MODEL_KEYS
from vlmtrain.models.freeze import apply_trainability
from vlmtrain.models.loss import count_supervised
from vlmtrain.models.vlm import VisionLanguageModel
from vlmtrain.precision import PrecisionPolicy, check_deepspeed_config, deepspeed_precision_config
from vlmtrain.train.engines.deepspeed import ds_config_path, resolve_ds_config

FIXTURES = Path(__file__).with_name("numerics_fixtures.py")
ENGINES = ("deepspeed", "fsdp")
LAYOUTS = ("pad", "pack")
GLOBAL = 8
# (ranks, micro-batch): 1 x 8 x accumulation 1, 1 x 2 x 4, 2 x 2 x 2.
TOPOLOGIES = ((1, 8), (1, 2), (2, 2))
BF16_MICRO_STEPS = 16


def run_jobs(tmp: Path, model_dir: Path, jobs: list[dict], ranks: int) -> None:
    spec = tmp / f"spec-{ranks}.json"
    spec.write_text(json.dumps({"model_dir": str(model_dir), "jobs": jobs}))
    cmd = [PYTHON, str(FIXTURES), str(spec)]
    if ranks > 1:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd[1:]]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def brute_force_gradients(model_dir: Path, precision: str) -> dict[str, torch.Tensor]:
    """The whole global batch in one padded forward: gradient of (sum of token losses) / (token count)."""
    stage = stage_for("deepspeed", precision, GLOBAL, GLOBAL)
    model = VisionLanguageModel.from_pretrained(model_dir)
    apply_trainability(model, stage.modules)
    model.train()
    samples = make_samples(model, GLOBAL)
    batch = collate(samples, "pad", 0, model.vision.config.image_size)
    out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, mask_mode=stage.mask.mode)
    (out.loss_sum / count_supervised(batch["labels"], batch["sample_ids"])).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, tiny_model_config) -> Path:
    out = tmp_path_factory.mktemp("numerics") / "model"
    torch.manual_seed(0)
    VisionLanguageModel.from_config(tiny_model_config, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def engine_gradients(model_dir: Path, tmp_path_factory) -> dict[tuple, dict[str, torch.Tensor]]:
    """Accumulated gradients of one fp32 step per (engine, ranks, micro, layout), and bf16 16-micro-step ones."""
    tmp = tmp_path_factory.mktemp("grads")
    jobs: dict[int, list[dict]] = {1: [], 2: []}
    keys = {}
    for engine in ENGINES:
        for ranks, micro in TOPOLOGIES:
            for layout in LAYOUTS:
                key = (engine, ranks, micro, layout)
                out = tmp / ("-".join(map(str, key)) + ".safetensors")
                jobs[ranks].append(
                    dict(engine=engine, precision="fp32", samples=GLOBAL, out=str(out), layout=layout)
                    | {"global": GLOBAL, "micro": micro}
                )
                keys[key] = out
        out = tmp / f"{engine}-bf16.safetensors"
        jobs[1].append(
            dict(engine=engine, precision="bf16", samples=BF16_MICRO_STEPS, out=str(out), layout="pad")
            | {"global": BF16_MICRO_STEPS, "micro": 1}
        )
        keys[(engine, "bf16")] = out
    for ranks, ranked in jobs.items():
        run_jobs(tmp, model_dir, ranked, ranks)
    return {k: load_file(str(v)) for k, v in keys.items()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("ranks", "micro"), TOPOLOGIES)
def test_step_gradient_is_the_global_batch_token_mean(
    engine_gradients, model_dir, engine, layout, ranks, micro
):
    reference = brute_force_gradients(model_dir, "fp32")
    got = engine_gradients[(engine, ranks, micro, layout)]
    assert set(got) == set(reference)
    scale = max(float(g.abs().max()) for g in reference.values())
    worst = max(float((got[n] - reference[n]).abs().max()) for n in reference)
    assert worst <= 1e-6 * scale, f"{engine} {ranks}x{micro} {layout}: max |diff| {worst:.3g} vs {scale:.3g}"


@pytest.fixture(scope="module")
def budget_gradients(model_dir: Path, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """One 2-rank token-budget step per engine (one packed row per micro-batch), through Trainer.train_step."""
    tmp = tmp_path_factory.mktemp("budget")
    jobs = [
        dict(engine=e, precision="fp32", samples=GLOBAL, out=str(tmp / f"{e}.safetensors"), layout="budget")
        | {"global": GLOBAL, "micro": 2, "budget": 1}
        for e in ENGINES
    ]
    run_jobs(tmp, model_dir, jobs, 2)
    return {e: load_file(str(tmp / f"{e}.safetensors")) for e in ENGINES}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_budget_step_with_unequal_micro_batch_counts_is_the_global_batch_token_mean(
    budget_gradients, model_dir, engine
):
    """Rank 0 holds the longest samples, so it needs more budget micro-batches than rank 1, which runs blank
    ones to match; the step's gradient is still the whole global batch's token mean."""
    got = dict(budget_gradients[engine])
    counts = got.pop("micro_counts").tolist()
    assert len(counts) == 2 and counts[0] > counts[1] >= 1, counts
    reference = brute_force_gradients(model_dir, "fp32")
    assert set(got) == set(reference)
    scale = max(float(g.abs().max()) for g in reference.values())
    worst = max(float((got[n] - reference[n]).abs().max()) for n in reference)
    assert worst <= 1e-6 * scale, f"{engine} budget {counts}: max |diff| {worst:.3g} vs {scale:.3g}"


def test_a_per_micro_batch_mean_would_fail_the_invariance(model_dir):
    """The invariance test can fail: averaging each micro-batch's own token mean gives another gradient."""
    reference = brute_force_gradients(model_dir, "fp32")
    stage = stage_for("deepspeed", "fp32", GLOBAL, 2)
    model = VisionLanguageModel.from_pretrained(model_dir)
    apply_trainability(model, stage.modules)
    model.train()
    samples = make_samples(model, GLOBAL)
    for i in range(0, GLOBAL, 2):
        batch = collate(samples[i : i + 2], "pad", 0, model.vision.config.image_size)
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, mask_mode=stage.mask.mode)
        (out.loss / (GLOBAL // 2)).backward()
    scale = max(float(g.abs().max()) for g in reference.values())
    worst = max(
        float((p.grad - reference[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad
    )
    assert worst > 1e-2 * scale


def bf16_micro_gradients(model_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Each micro-batch's gradient as bf16 compute produces it (parameters cast to bf16, buffers fp32), with the
    token weighting the engines apply (1 / the step's token count)."""
    stage = stage_for("deepspeed", "bf16", BF16_MICRO_STEPS, 1)
    model = VisionLanguageModel.from_pretrained(model_dir)
    apply_trainability(model, stage.modules)
    model.train()
    samples = make_samples(model, BF16_MICRO_STEPS)
    size = model.vision.config.image_size
    batches = [collate([s], "pad", 0, size) for s in samples]
    total = sum(count_supervised(b["labels"], b["sample_ids"]) for b in batches)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    grads = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, mask_mode=stage.mask.mode)
        (out.loss_sum * (1.0 / total)).backward()
        # A text-only micro-batch leaves the image path without gradient: zero (the engines' blank image row).
        grads.append(
            {
                n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_compute_accumulates_in_fp32(engine_gradients, model_dir, engine):
    """16 bf16 micro-batch gradients: the engine's sum is >= 4x closer to the exact sum than a bf16 running sum.

    The reference is the exact (fp64) sum of the same bf16 micro-batch gradients, so what is measured is the
    accumulation alone: a bf16 running sum keeps 8 significant bits of a total that grows 16x.
    """
    micro = bf16_micro_gradients(model_dir)
    names = list(micro[0])
    exact = {n: sum(g[n].double() for g in micro) for n in names}
    running = {}
    for n in names:
        acc = torch.zeros_like(micro[0][n])  # bf16
        for g in micro:
            acc = acc + g[n]
        running[n] = acc

    def rel_error(got: dict[str, torch.Tensor]) -> float:
        num = sum(float((got[n].double() - exact[n]).square().sum()) for n in names)
        den = sum(float(exact[n].square().sum()) for n in names)
        return (num / den) ** 0.5

    got = engine_gradients[(engine, "bf16")]
    engine_error, bf16_error = rel_error(got), rel_error(running)
    print(
        f"{engine}: relative error of the accumulated gradient {engine_error:.3g}, bf16 running sum {bf16_error:.3g}"
    )
    assert bf16_error > 0
    assert engine_error * 4 <= bf16_error, (engine_error, bf16_error)


# ---- bf16 checkpoints train with fp32 masters ---------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_components(tmp_path_factory, tokenizer, tiny_model_config) -> tuple[Path, Path]:
    """A tiny SigLIP and a tiny Qwen2 saved in bf16 with transformers' save_pretrained (as Qwen2.5 ships)."""
    root = tmp_path_factory.mktemp("bf16ckpt")
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config, tokenizer)
    vision, language = root / "vision", root / "language"
    model.vision.to(torch.bfloat16).save_pretrained(str(vision))
    model.language.to(torch.bfloat16).save_pretrained(str(language))
    tokenizer.save_pretrained(str(language))
    return vision, language


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_checkpoint_trains_with_fp32_masters(bf16_components, tmp_path, engine):
    vision, language = bf16_components
    assert json.loads((language / "config.json").read_text())["dtype"] == "bfloat16"
    stage = json.loads(shipped_stage_path(2).read_text())
    stage["init_from"] = None
    stage["model"] = {"vision": str(vision), "language": str(language)}
    stage["batch"] = {"global_batch_size": 2, "micro_batch_size": 2}
    stage["train"].update(engine=engine, precision="bf16", max_steps=4)
    stage["optim"].update(warmup_ratio=0.0)
    out = tmp_path / f"{engine}.safetensors"
    run_jobs(tmp_path, tmp_path, [{"kind": "masters", "stage": stage, "out": str(out)}], 1)
    tensors = load_file(str(out))
    loaded = {k[len("loaded.") :]: v for k, v in tensors.items() if k.startswith("loaded.")}
    before = {k[len("before.") :]: v for k, v in tensors.items() if k.startswith("before.")}
    after = {k[len("after.") :]: v for k, v in tensors.items() if k.startswith("after.")}
    assert loaded and all(t.dtype == torch.float32 for t in loaded.values())
    assert before and all(t.dtype == torch.float32 for t in (*before.values(), *after.values()))
    for name, t in before.items():
        # The masters start at the checkpoint's values exactly (bf16 values are exact in fp32).
        assert torch.equal(t, loaded[name]), name
    # One AdamW step at the stage's LRs moves weights by ~lr, below half a bf16 ulp for most of them: the
    # masters keep the update, bf16 masters would have rounded it away.
    moved = kept_only_in_fp32 = total = 0
    for name, b in before.items():
        a = after[name]
        moved += int((a != b).sum())
        kept_only_in_fp32 += int(((a != b) & (a.bfloat16().float() == b)).sum())
        total += b.numel()
    assert moved > 0.5 * total
    assert kept_only_in_fp32 > 0.5 * moved


# ---- the policy and DeepSpeed's config agree -----------------------------------------------------------


@pytest.mark.parametrize("config", ["zero2_bf16", "zero2_offload_bf16", "zero3_bf16", "zero3_offload_bf16"])
def test_shipped_ds_configs_state_the_policy(config):
    shipped = json.loads(ds_config_path(config).read_text())
    stage = stage_for("deepspeed", "bf16", 8, 2)
    stage = dataclasses.replace(stage, train=dataclasses.replace(stage.train, ds_config=config))
    resolved = resolve_ds_config(stage, world_size=1)
    for key in ("data_types", "communication_data_type"):
        assert shipped[key] == resolved[key]
    assert resolved["data_types"] == {"grad_accum_dtype": "fp32"}
    assert resolved["communication_data_type"] == "fp32"
    assert resolved["bf16"]["enabled"] is True


def test_fp32_compute_disables_bf16_but_keeps_fp32_accumulation():
    cfg = deepspeed_precision_config(PrecisionPolicy.for_precision("fp32"))
    assert cfg["bf16"]["enabled"] is False
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["communication_data_type"] == "fp32"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"data_types": {"grad_accum_dtype": "bf16"}}, "grad_accum_dtype"),
        ({"communication_data_type": "bf16"}, "communication_data_type"),
        ({"fp16": {"enabled": True}}, "fp16"),
    ],
)
def test_a_ds_config_that_contradicts_the_policy_is_refused(override, named):
    with pytest.raises(ValueError, match=named) as err:
        check_deepspeed_config(override, PrecisionPolicy.for_precision("bf16"), "my.json")
    assert "my.json" in str(err.value) and "Remove these keys" in str(err.value)


def test_policy_is_fp32_except_compute():
    policy = PrecisionPolicy.for_precision("bf16")
    assert policy.as_dict() == {
        "master": "fp32",
        "compute": "bf16",
        "grad_accum": "fp32",
        "reduce": "fp32",
        "frozen": "bf16",
        "load": "fp32",
    }
    with pytest.raises(ValueError, match=r"train\.precision"):
        PrecisionPolicy.for_precision("fp16")


def test_row_length_packs_several_samples(model_dir):
    """The packed layout of the invariance test really packs: fewer rows than samples."""
    model = VisionLanguageModel.from_pretrained(model_dir)
    samples = make_samples(model, GLOBAL)
    batch = collate(samples, "pack", row_length_for(samples), model.vision.config.image_size)
    assert batch["input_ids"].shape[0] < GLOBAL
