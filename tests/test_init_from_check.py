"""A stage's `model` block against its `init_from` checkpoint: keys that disagree are refused before any
weight loads, keys that agree (or were never written) pass, and the checkpoint's block carries down a chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VISION, tiny_language_config

from vlmtrain.config.load import load_stage_config, shipped_stage_path, stage_config_to_dict
from vlmtrain.config.schema import ModelConfig, given_keys
from vlmtrain.dist import DistContext
from vlmtrain.models.language import language_config_from_dict
from vlmtrain.models.vlm import VisionLanguageModel
from vlmtrain.train import run
from vlmtrain.train.init_check import InitFromMismatch
from vlmtrain.train.preflight import PreflightError
from vlmtrain.train.trainer import FINAL

WORLD_OF_ONE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_block(tokenizer_dir: Path, vocab: int, **extra) -> dict:
    return {
        "vision": None,
        "vision_config": TINY_VISION,
        "language": None,
        "language_config": tiny_language_config(vocab),
        "tokenizer": str(tokenizer_dir),
        **extra,
    }


def write_config(path: Path, stage: int, **changes) -> Path:
    data = json.loads(shipped_stage_path(stage).read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def run_dir(tmp_path, tokenizer) -> Path:
    """RUN/stage0/final: a stage-0 output of the tiny model (vision_feature_layer -2), as the trainer writes it."""
    tok = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok))
    cfg = load_stage_config(
        config=write_config(
            tmp_path / "stage0.json", 0, model=tiny_block(tok, len(tokenizer), vision_feature_layer=-2)
        )
    )
    model, tok_obj = run.load_model_and_tokenizer(cfg, tmp_path / "unused")
    out = tmp_path / "run" / "stage0" / FINAL
    model.save_pretrained(out)
    tok_obj.save_pretrained(str(out))
    (out / "stage_config.json").write_text(json.dumps(stage_config_to_dict(cfg)))
    return tmp_path / "run"


def stage1(tmp_path: Path, overrides: list[str], **changes):
    return load_stage_config(config=write_config(tmp_path / "stage1.json", 1, **changes), overrides=overrides)


def no_loads(monkeypatch) -> list[str]:
    """Fail the test if any weights or tokenizer load; returns the list of attempted loads."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(str(args[:1]))
        raise AssertionError("a load happened before the init_from check")

    monkeypatch.setattr(VisionLanguageModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse(*a)))
    monkeypatch.setattr(run.AutoTokenizer, "from_pretrained", refuse)
    return attempts


def test_the_loader_records_the_keys_the_file_and_set_wrote(tmp_path):
    shipped = load_stage_config(stage=2)
    assert given_keys(shipped.model) == {"attn_backend"}  # the presets with init_from name no sources
    assert shipped.model.language == "Qwen/Qwen2.5-0.5B"  # ... while the default still names a hub id
    cfg = load_stage_config(stage=2, overrides=["model.vision_feature_layer=-1", "train.seed=3"])
    assert given_keys(cfg.model) == {"attn_backend", "vision_feature_layer"}
    assert given_keys(cfg.train) >= {"seed", "engine"}
    path = tmp_path / "bare.json"
    path.write_text(
        json.dumps({"name": "bare", "modules": json.loads(shipped_stage_path(2).read_text())["modules"]})
    )
    assert given_keys(load_stage_config(config=path).model) == frozenset()  # no `model` key at all


def test_defaults_are_not_judged_and_attn_backend_applies_on_top(run_dir, tmp_path, tokenizer):
    saved = VisionLanguageModel.from_pretrained(run_dir / "stage0" / FINAL)
    cfg = stage1(tmp_path, ["model.attn_backend=eager"])
    # The defaults (hub ids, the family's feature layer) all differ from the tiny checkpoint; none was written.
    assert (cfg.model.language, cfg.model.vision_feature_layer) == ("Qwen/Qwen2.5-0.5B", None)
    model, _ = run.load_model_and_tokenizer(cfg, run_dir)
    assert model.attn_backend == "eager" and model.vision_feature_layer == -2
    for (name, p), (_, q) in zip(model.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    # The resolved stage carries the checkpoint's block (what stage_config.json will record).
    resolved = run.resolve_model(cfg, run_dir)
    written = json.loads((run_dir / "stage0" / FINAL / "stage_config.json").read_text())["model"]
    assert stage_config_to_dict(resolved)["model"] == {**written, "attn_backend": "eager"}


def test_agreeing_keys_pass_even_when_spelled_differently(run_dir, tmp_path, tokenizer):
    overrides = [
        f"model.tokenizer={tmp_path / 'x' / '..' / 'tok'}",  # another spelling of the same directory
        f"model.language_config={json.dumps(tiny_language_config(len(tokenizer)))}",
        f"model.vision_config={json.dumps(TINY_VISION)}",
        "model.vision=null",
        "model.language=null",
        "model.vision_feature_layer=-2",
        "model.projector_hidden_act=gelu",
    ]
    (tmp_path / "x").mkdir()
    cfg = stage1(tmp_path, overrides)
    assert run.resolve_model(cfg, run_dir).model.vision_feature_layer == -2


def test_disagreeing_keys_are_one_error_naming_keys_values_and_the_fix(
    run_dir, tmp_path, tokenizer, monkeypatch
):
    attempts = no_loads(monkeypatch)
    lm = {**tiny_language_config(len(tokenizer)), "hidden_size": 128}
    cfg = stage1(
        tmp_path,
        [
            "model.vision_feature_layer=-1",  # the default value, but written: judged
            "model.projector_hidden_act=relu",
            f"model.language_config={json.dumps(lm)}",
            "model.language=null",  # agrees: the stage-0 LM was built from a config too
            "model.tokenizer=Qwen/Qwen2.5-0.5B",
            "model.attn_backend=eager",  # allowed: not in the message
        ],
    )
    with pytest.raises(InitFromMismatch) as err:
        run.load_model_and_tokenizer(cfg, run_dir)
    text = str(err.value)
    assert attempts == []
    assert text.startswith("stage stage1: ") and "init_from='stage0'" in text
    assert str(run_dir / "stage0" / FINAL) in text
    lines = text.splitlines()[1:-1]
    assert lines == [
        "  model.language_config.hidden_size: 128 here, 64 in the checkpoint",
        '  model.projector_hidden_act: "relu" here, "gelu" in the checkpoint',
        f'  model.tokenizer: "Qwen/Qwen2.5-0.5B" here, "{tmp_path / "tok"}" in the checkpoint',
        "  model.vision_feature_layer: -1 here, -2 in the checkpoint",
    ]
    assert "attn_backend" not in "".join(lines)
    assert text.splitlines()[-1].startswith("fix: drop these keys") and "set init_from to null" in text


def test_a_partial_config_is_judged_by_the_architecture_it_builds(run_dir, tmp_path, tokenizer, monkeypatch):
    no_loads(monkeypatch)
    lm = tiny_language_config(len(tokenizer))
    del lm["intermediate_size"]  # would build Qwen2Config's default width, not the checkpoint's 128
    cfg = stage1(tmp_path, [f"model.language_config={json.dumps(lm)}", "model.language=null"])
    default_width = language_config_from_dict({"model_type": "qwen2"}).intermediate_size
    with pytest.raises(
        InitFromMismatch, match=rf"intermediate_size: {default_width} here, 128 in the checkpoint"
    ):
        run.resolve_model(cfg, run_dir)


def test_a_model_directory_without_stage_config_cannot_vouch_for_sources(run_dir, tmp_path, tokenizer):
    bare = tmp_path / "bare"
    VisionLanguageModel.from_pretrained(run_dir / "stage0" / FINAL).save_pretrained(bare)
    tokenizer.save_pretrained(str(bare))
    # Architecture keys are checked against vlm_config.json (a full config agrees with the partial one).
    ok = stage1(
        tmp_path,
        [
            f"model.vision_config={json.dumps(TINY_VISION)}",
            "model.vision_feature_layer=-2",
            "model.vision=null",
        ],
        init_from=str(bare),
    )
    assert run.resolve_model(ok, run_dir).model.vision_config["hidden_size"] == TINY_VISION["hidden_size"]
    bad = stage1(tmp_path, ["model.language=Qwen/Qwen2.5-0.5B"], init_from=str(bare))
    with pytest.raises(
        InitFromMismatch, match=r"model\.language: \"Qwen/Qwen2\.5-0\.5B\" here, but .* records no sources"
    ):
        run.resolve_model(bad, run_dir)


def test_the_checkpoint_block_carries_down_a_chain(run_dir, tmp_path):
    """stage1's output records stage0's block, so stage2 can check a source stage0 wrote two hops up."""
    cfg1 = run.resolve_model(stage1(tmp_path, []), run_dir)
    out1 = run_dir / "stage1" / FINAL
    out1.mkdir(parents=True)
    for name in ("vlm_config.json", "model.safetensors"):
        (out1 / name).write_bytes((run_dir / "stage0" / FINAL / name).read_bytes())
    (out1 / "stage_config.json").write_text(json.dumps(stage_config_to_dict(cfg1)))
    path = write_config(tmp_path / "stage2.json", 2)
    agree = load_stage_config(config=path, overrides=[f"model.tokenizer={tmp_path / 'tok'}"])
    assert run.resolve_model(agree, run_dir).model.tokenizer == str(tmp_path / "tok")
    disagree = load_stage_config(config=path, overrides=["model.vision=google/siglip-so400m-patch14-224"])
    with pytest.raises(
        InitFromMismatch, match=r'model\.vision: "google/siglip-so400m-patch14-224" here, null in'
    ):
        run.resolve_model(disagree, run_dir)


def test_a_chained_stage_not_run_yet_is_checked_before_anything_trains(tmp_path, tokenizer, monkeypatch):
    attempts = no_loads(monkeypatch)
    tok = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok))
    block = tiny_block(tok, len(tokenizer))
    s0 = load_stage_config(config=write_config(tmp_path / "s0.json", 0, model=block))
    s1 = load_stage_config(
        config=write_config(tmp_path / "s1.json", 1, model={**block, "projector_hidden_act": "relu"})
    )
    with pytest.raises(PreflightError, match=r"stage1 init_from: .*trained earlier in this run") as err:
        run.run_stages([s0, s1], tmp_path / "run", WORLD_OF_ONE)
    assert any(isinstance(c, InitFromMismatch) for c in err.value.causes)
    assert '"relu" here, "gelu" in the checkpoint' in str(err.value)
    assert attempts == [] and not (tmp_path / "run").exists()
    # The same block with only attn_backend changed agrees with the planned stage-0 block.
    s1_ok = load_stage_config(
        config=write_config(tmp_path / "s1.json", 1, model={**block, "attn_backend": "eager"})
    )
    planned = {"stage0": run.resolve_model(s0, tmp_path / "run").model}
    assert run.resolve_model(s1_ok, tmp_path / "run", planned).model == ModelConfig(
        **{**block, "attn_backend": "eager"}
    )
    # An init_from that names neither an earlier stage nor a directory fails up front too.
    with pytest.raises(PreflightError, match="stage1 init_from: init_from='stage0' found no model"):
        run.run_stages([s1_ok], tmp_path / "run", WORLD_OF_ONE)


def test_train_command_reports_the_mismatch_in_one_line_and_exits_2(tmp_path, tokenizer):
    """Through `vlmtrain train` (a subprocess: a failing run leaves with os._exit): exit 2, no traceback."""
    import subprocess

    from train_fixtures import PYTHON, train_env

    tok = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok))
    block = tiny_block(tok, len(tokenizer))
    s0 = write_config(tmp_path / "s0.json", 0, model=block)
    s1 = write_config(tmp_path / "s1.json", 1, model={**block, "projector_hidden_act": "relu"})
    cmd = [PYTHON, "-m", "vlmtrain.cli", "train", "--config", str(s0), "--config", str(s1)]
    proc = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "run")],
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert '"relu" here, "gelu" in the checkpoint' in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
