"""Resuming reuses a completed stage only for the config it was trained with (a changed one is a preflight
problem, before anything loads)."""

from __future__ import annotations

import json
from pathlib import Path

from vlmtrain.config.load import (
    config_changes,
    read_json,
    shipped_stage_path,
    stage_config_from_dict,
    stage_config_to_dict,
)
from vlmtrain.train.preflight import check_completed_stages, completed_stage_changes, preflight
from vlmtrain.train.trainer import DONE_MARKER, FINAL


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


def test_settings_added_after_a_stage_ran_are_not_changes(tmp_path: Path) -> None:
    """A stage trained by an older vlmtrain has no `train.checkpoint_format` (nor `train.compile`) in its
    stage_config.json: resuming must not call the new keys' defaults a change, while a real change still shows."""
    final = completed(tmp_path, stage(4))
    saved = json.loads((final / "stage_config.json").read_text())
    del saved["train"]["checkpoint_format"], saved["train"]["compile"]
    (final / "stage_config.json").write_text(json.dumps(saved))
    assert completed_stage_changes(tmp_path / "stage2", stage(4)) == []
    assert completed_stage_changes(tmp_path / "stage2", stage(8)) == ["train.max_steps: 4 -> 8"]
    assert completed_stage_changes(tmp_path / "stage2", stage(8, lr=1e-3)) == [
        "modules.language.lr: 2e-05 -> 0.001",
        "train.max_steps: 4 -> 8",
    ]


def test_resume_accepts_a_completed_stage_with_its_config(tmp_path: Path) -> None:
    completed(tmp_path, stage(4))
    assert check_completed_stages([stage(4)], tmp_path, resume=True) == []


def test_resume_refuses_a_completed_stage_with_another_config(tmp_path: Path) -> None:
    final = completed(tmp_path, stage(4))
    (problem,) = check_completed_stages([stage(8)], tmp_path, resume=True)
    assert problem.where == "stage2 (--resume)"
    assert "trained with another config (train.max_steps: 4 -> 8)" in problem.message
    assert str(final) in problem.message and "new run dir" in problem.message
    # Without --resume the stage is not skipped, so its old config does not matter here.
    assert check_completed_stages([stage(8)], tmp_path, resume=False) == []
    # It is one of the problems preflight lists (with the shipped preset's missing data beside it).
    lines = [p.line() for p in preflight([stage(8)], tmp_path, world_size=1, resume=True).problems]
    assert problem.line() in lines
