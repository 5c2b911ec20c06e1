"""Resuming reuses a completed stage only for the config it was trained with (a changed one is an error)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmtrain.config.load import read_json, shipped_stage_path, stage_config_from_dict, stage_config_to_dict
from vlmtrain.dist import DistContext
from vlmtrain.train import run as run_module
from vlmtrain.train.trainer import DONE_MARKER, FINAL, completed_stage_changes, config_changes


def stage(max_steps: int = 4, lr: float | None = None):
    data = read_json(shipped_stage_path(2))
    data["train"]["max_steps"] = max_steps
    if lr is not None:
        data["modules"]["language"]["lr"] = lr
    return stage_config_from_dict(data, source="test")


def completed(run_dir: Path, cfg) -> Path:
    final = run_dir / cfg.name / FINAL
    final.mkdir(parents=True)
    (final / "stage_config.json").write_text(json.dumps(stage_config_to_dict(cfg)))
    (final / DONE_MARKER).write_text("")
    return final


def test_config_changes_names_every_differing_leaf() -> None:
    saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
    current = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "new": None}
    assert config_changes(saved, current) == ["b.c: [1, 2] -> [1, 3]", "gone: 0 -> None"]
    assert config_changes(saved, saved) == []


def test_completed_stage_changes(tmp_path: Path) -> None:
    completed(tmp_path, stage(4))
    assert completed_stage_changes(tmp_path / "stage2", stage(4)) == []
    assert completed_stage_changes(tmp_path / "stage2", stage(8, lr=1e-3)) == [
        "modules.language.lr: 2e-05 -> 0.001",
        "train.max_steps: 4 -> 8",
    ]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """run_stages with preflight passed and a stage run recorded instead of trained."""
    trained: list[str] = []
    monkeypatch.setattr(run_module, "require_preflight", lambda *a, **k: SimpleNamespace(notes=[]))
    monkeypatch.setattr(run_module, "run_stage", lambda s, *a, **k: trained.append(s.name) or Path(s.name))
    return trained


def test_resume_skips_a_completed_stage_with_its_config(tmp_path: Path, no_training: list[str]) -> None:
    final = completed(tmp_path, stage(4))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert run_module.run_stages([stage(4)], tmp_path, ctx, resume=True) == [final]
    assert no_training == []


def test_resume_refuses_a_completed_stage_with_another_config(tmp_path: Path, no_training: list[str]) -> None:
    final = completed(tmp_path, stage(4))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="trained with another config") as err:
        run_module.run_stages([stage(8)], tmp_path, ctx, resume=True)
    assert "train.max_steps: 4 -> 8" in str(err.value) and str(final) in str(err.value)
    assert "new run dir" in str(err.value)
    assert no_training == []
