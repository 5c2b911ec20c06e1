"""Weights & Biases logging: an offline run of a tiny stage holds every step of metrics.jsonl, the stage config,
the module-group table and the LR read-back; without the package, `train.wandb` fails with the extra to install.

The offline run is read from its `.wandb` file, a LevelDB-style log of `wandb.proto` Record messages (the
reader below follows wandb's datastore format), so the check is what `wandb sync` would upload.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from train_fixtures import TrainData, load_weights, read_metrics, run_training, tiny_stage_config, train_data

from vlmtrain.config import MODULE_GROUPS

STEPS = 4
BLOCK = 32768  # the datastore's block size; a record header never straddles a block end
HEADER = struct.Struct("<IHB")  # crc32, length, kind (1 full, 2 first, 3 middle, 4 last)
W_AND_B_META = ("_step", "_runtime", "_timestamp", "_wandb")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tmp_path_factory.getbasetemp())


def wandb_records(path: Path) -> list[Any]:
    """Every Record of an offline run's `.wandb` file, in write order."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B datastore (header {raw[:7]!r})"
    records, pos, pending = [], 7, b""
    while pos + HEADER.size <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # block trailer padding
            pos += left
            continue
        _, length, kind = HEADER.unpack_from(raw, pos)
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += raw[pos + HEADER.size : pos + HEADER.size + length]
        pos += HEADER.size + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items: Any) -> dict[str, Any]:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A metrics.jsonl record with nested keys joined by '/' (the TensorBoard / W&B names)."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.slow
def test_offline_run_holds_every_step_config_and_tables(
    tmp_path: Path, data: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="W&B logging needs the extra: pip install -e '.[wandb]'")
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_stage_config(
        0,
        data,
        max_steps=STEPS,
        save_every=0,
        train={"wandb": {"project": "vlmtrain-test", "tags": ["tiny"]}, "log_every": 1},
    )
    config = tmp_path / "stage0.json"
    config.write_text(json.dumps(cfg))
    run_training([config], tmp_path / "run")
    stage_dir = tmp_path / "run" / "stage0"

    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = wandb_records(files[0])
    by_type: dict[str, list[Any]] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        by_type.setdefault(kind, []).append(getattr(r, kind))

    # The run: project, name, group, tags, its id kept in the stage folder, and the resolved stage config.
    (run,) = by_type["run"]
    assert run.project == "vlmtrain-test" and run.display_name == "run/stage0" and run.run_group == "run"
    assert list(run.tags) == ["tiny", "stage0"]
    assert (stage_dir / "wandb_run_id").read_text().strip() == run.run_id
    logged_config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    resolved = json.loads((stage_dir / "final" / "stage_config.json").read_text())
    assert logged_config.pop("launch") == {"world_size": 1, "total_steps": STEPS}
    assert logged_config == resolved

    # Every step: the same keys and values as metrics.jsonl (floats exactly, nested keys as a/b).
    jsonl = read_metrics(stage_dir / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == list(range(1, STEPS + 1))
    history = [_items(h.item) for h in by_type["history"]]
    assert [h["_step"] for h in history] == [r["step"] for r in jsonl]
    for row, record in zip(history, jsonl, strict=True):
        expected = {k: v for k, v in flat(record).items() if k != "step"}
        got = {k: v for k, v in row.items() if k not in W_AND_B_META}
        assert got == expected, f"step {record['step']}"
    assert {"loss", "grad_norm", "lr/projector", "lr/projector.no_decay", "tokens_per_s"} <= set(expected)

    # Summary: the module-group table (against the saved weights) and the LR read-back (against step 1's LRs).
    summary: dict[str, Any] = {}
    for s in by_type["summary"]:
        summary.update(_items(s.update))
    assert summary["trainability"]["_type"] == "table-file"
    assert summary["lr_readback"]["_type"] == "table-file"
    media = files[0].parent / "files" / "media" / "table"
    groups = _table(media, "trainability")
    weights = load_weights(stage_dir / "final" / "model.safetensors")
    assert groups["columns"] == ["group", "status", "params", "trainable", "adapters", "lr"]
    expected_groups = []
    for group in MODULE_GROUPS:
        n = sum(t.numel() for name, t in weights.items() if name.split(".")[0] == group)
        module = cfg["modules"][group]
        status = "TRAINABLE" if module["trainable"] else "Frozen"
        expected_groups.append([group, status, n, n if module["trainable"] else 0, 0, module["lr"]])
    assert groups["data"] == expected_groups
    lrs = _table(media, "lr_readback")
    assert lrs["columns"] == ["group", "lr now", "peak (config)"]
    assert lrs["data"] == [
        [name, lr, cfg["modules"][name.split(".")[0]]["lr"]] for name, lr in jsonl[0]["lr"].items()
    ]


def _table(media: Path, key: str) -> dict[str, Any]:
    (path,) = media.glob(f"{key}_summary_*.table.json")
    return json.loads(path.read_text())


def test_wandb_section_without_the_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmtrain.config.schema import WandbConfig
    from vlmtrain.logging import WandbMissing, WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec finds nothing
    with pytest.raises(WandbMissing, match=r"pip install 'vlmtrain\[wandb\]' \(or set train.wandb to null\)"):
        WandbSink.open(WandbConfig(project="p"), tmp_path / "stage", "stage0", {}, resume=False)
    assert not (tmp_path / "stage").exists()


def test_wandb_section_is_validated() -> None:
    from vlmtrain.config.load import ConfigError, load_stage_config

    cfg = load_stage_config(0, overrides=['train.wandb={"project": "p", "tags": ["a", "b"]}'])
    assert cfg.train.wandb is not None and cfg.train.wandb.tags == ("a", "b")
    assert load_stage_config(0).train.wandb is None  # off by default
    with pytest.raises(ConfigError, match=r"train\.wandb\.tags: expected a list"):
        load_stage_config(0, overrides=['train.wandb={"project": "p", "tags": "a"}'])
    with pytest.raises(ConfigError, match=r"train\.wandb\.project: must not be empty"):
        load_stage_config(0, overrides=["train.wandb.project="])
    with pytest.raises(ConfigError, match=r"train\.wandb\.project: required key is missing"):
        load_stage_config(0, overrides=["train.wandb.tags=[]"])
