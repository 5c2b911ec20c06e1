"""docs/stage_configs.md cannot drift from the schema: every field, type, default, preset LR, JSON example
and quoted validation message is checked against the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import re
import shlex
from pathlib import Path
from types import ModuleType
from typing import get_type_hints

import pytest

from vlmtrain.config import schema
from vlmtrain.config.load import (
    ConfigError,
    load_stage_config,
    read_json,
    shipped_stage_path,
    stage_config_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "stage_configs.md"
PRESETS = ("stage0", "stage1", "stage2", "stage3")
GROUPS = ("vision", "projector", "language")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", REPO / "docs" / "gen_config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _schema_dataclasses() -> list[type]:
    """Every config dataclass defined in vlmtrain.config.schema (not only those StageConfig nests today)."""
    return [
        cls
        for _, cls in inspect.getmembers(schema, inspect.isclass)
        if dataclasses.is_dataclass(cls) and cls.__module__ == schema.__name__
    ]


def _section(text: str, heading: str) -> str:
    """The Markdown from `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.find(f"\n{heading}\n")
    assert start >= 0, f"docs/stage_configs.md has no section {heading!r}"
    rest = text[start + len(heading) + 2 :]
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)]
    return rest[: ends[0]] if ends else rest


def _table_rows(section: str) -> list[list[str]]:
    """Cells of every Markdown table row (header and separator rows excluded)."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-", " "}:
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows[1:]  # drop the header row


def test_schema_has_the_sections_the_brief_names() -> None:
    names = {cls.__name__ for cls in _schema_dataclasses()}
    expected = {"ModelConfig", "ModuleGroupConfig", "MaskConfig", "DataConfig", "BatchConfig"}
    assert expected | {"OptimConfig", "TrainConfig", "StageConfig"} <= names


@pytest.mark.parametrize("cls", _schema_dataclasses(), ids=lambda c: c.__name__)
def test_every_field_is_documented_in_its_section(cls: type) -> None:
    rows = _table_rows(_section(_doc(), f"### {cls.__name__}"))
    documented = [row[0] for row in rows]
    fields = [f"`{f.name}`" for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in documented]
    assert not missing, (
        f"{cls.__name__}: {missing} not in docs/stage_configs.md; run python docs/gen_config_reference.py"
    )
    assert documented == fields, (
        f"{cls.__name__}: documented keys {documented} differ from the fields {fields}"
    )


@pytest.mark.parametrize("cls", _schema_dataclasses(), ids=lambda c: c.__name__)
def test_documented_types_and_defaults_match_the_dataclass(cls: type) -> None:
    gen = _generator()
    rows = {row[0]: row for row in _table_rows(_section(_doc(), f"### {cls.__name__}"))}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        row = rows[f"`{f.name}`"]
        assert row[1] == gen.type_text(hints[f.name]).replace("|", "\\|"), f"{cls.__name__}.{f.name} type"
        assert row[2] == gen.default_text(f), f"{cls.__name__}.{f.name} default"
        if f.default is not dataclasses.MISSING:  # an independent check of the default, not via the generator
            assert json.loads(row[2].strip("`")) == json.loads(json.dumps(f.default))


def test_generated_reference_is_current() -> None:
    gen = _generator()
    assert gen.current_block(_doc()) == gen.render(), (
        "docs/stage_configs.md is stale: run python docs/gen_config_reference.py"
    )


def _preset_rows() -> dict[str, list[str]]:
    rows = _table_rows(_section(_doc(), "## The shipped presets and the paper's Table V"))
    return {row[0].strip("`"): row for row in rows if row[0].strip("`") in PRESETS}


def test_preset_table_matches_the_shipped_json() -> None:
    rows = _preset_rows()
    assert sorted(rows) == list(PRESETS)
    for name in PRESETS:
        data = read_json(shipped_stage_path(name))
        row = rows[name]
        for group, cell in zip(GROUPS, row[1:4], strict=True):
            documented = float(cell.split()[0])
            assert documented == pytest.approx(data["modules"][group]["lr"], rel=0, abs=0), (
                name,
                group,
                cell,
            )
            assert ("frozen" in cell) == (not data["modules"][group]["trainable"]), (name, group, cell)
        assert row[4] == f"`{data['mask']['mode']}`"
        assert float(row[5]) == data["mask"]["noise_ratio"]
        assert row[6] == data["data"]["dataset"]
        assert row[7].split()[0] == f"`{json.dumps(data['init_from']).strip(chr(34))}`"


def test_preset_table_lrs_match_the_papers_table_v_column() -> None:
    """The last column quotes the paper (vision / projector / language); the presets must agree with it."""
    for name, row in _preset_rows().items():
        paper = [float(x) for x in re.search(r"V[a-d]: (\S+) / (\S+) / (\S+),", row[8]).groups()]  # type: ignore[union-attr]
        assert paper == [float(c.split()[0]) for c in row[1:4]], name


def test_shared_preset_settings_match_every_preset() -> None:
    section = _section(_doc(), "## The shipped presets and the paper's Table V")
    configs = [load_stage_config(stage=name) for name in PRESETS]
    claims = {
        "`batch.global_batch_size`": lambda c: c.batch.global_batch_size == 128,
        "`batch.micro_batch_size`": lambda c: c.batch.micro_batch_size == "auto",
        "`optim.min_lr`": lambda c: c.optim.min_lr == 1e-8,
        "`optim.warmup_ratio`": lambda c: c.optim.warmup_ratio == 0.03,
        "`optim.grad_clip`": lambda c: c.optim.grad_clip == 1.0,
        "`optim.eps`": lambda c: c.optim.eps == 1e-8,
        "`train.epochs`": lambda c: c.train.epochs == 1,
        "`model.attn_backend`": lambda c: c.model.attn_backend == "auto",
        "`data.caption_choice`": lambda c: c.data.caption_choice == "first",
    }
    documented = {row[0] for row in _table_rows(section)}
    for key, holds in claims.items():
        assert key in documented, key
        assert all(holds(c) for c in configs), key
    assert all(c.optim.betas == (0.9, 0.999) and c.optim.weight_decay == 0.01 for c in configs)
    assert [c.data.max_length for c in configs] == [768, 768, 768, 2048]
    assert all((c.train.save_every, c.train.keep_checkpoints) == (200, 2) for c in configs)


def _json_examples(text: str) -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.S)]


def test_json_examples_are_valid_stage_configs() -> None:
    examples = _json_examples(_doc())
    assert len(examples) >= 3
    for example in examples:
        cfg = stage_config_from_dict(example, source="docs/stage_configs.md example")
        assert cfg.name == example["name"]


def test_recipe_examples_chain_by_init_from() -> None:
    by_name = {e["name"]: e for e in _json_examples(_doc())}
    assert by_name["align"]["init_from"] is None
    assert by_name["pretrain"]["init_from"] == "align"
    assert by_name["pathvqa"]["init_from"] == "stage3"


def _override_rows() -> list[tuple[list[str], str]]:
    section = _section(_doc(), "## Validation and its messages")
    out = []
    for row in _table_rows(section):
        overrides = [o.strip("'") for o in re.findall(r"--set ('[^']*'|\S+?)(?=`| --set|$)", row[0])]
        if overrides:
            message = row[1][2:-2] if row[1].startswith("``") else row[1].strip("`")
            out.append((overrides, message))
    return out


def test_documented_messages_are_what_the_loader_says() -> None:
    rows = _override_rows()
    assert len(rows) >= 10
    for overrides, message in rows:
        with pytest.raises(ConfigError) as err:
            load_stage_config(stage=1, overrides=overrides)
        text = str(err.value)
        assert text.split("stage1.json: ", 1)[-1] == message, overrides


# ---- commands shown in the docs are real ------------------------------------------------------------

COMMAND_DOCS = ("docs/training.md", "docs/stage_configs.md", "launch/slurm/README.md")


def _shell_commands(text: str) -> list[list[str]]:
    """Every command of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def _train_invocations() -> list[tuple[str, list[str], list[str]]]:
    """(doc, launcher tokens before the training script, training arguments) for each training command."""
    found = []
    for doc in COMMAND_DOCS:
        for tokens in _shell_commands((REPO / doc).read_text(encoding="utf-8")):
            if "launch/train.py" in tokens:
                i = tokens.index("launch/train.py")
                found.append((doc, tokens[:i], tokens[i + 1 :]))
            elif tokens[:2] == ["vlmtrain", "train"]:
                found.append((doc, tokens[:2], tokens[2:]))
    return found


def test_training_commands_in_the_docs_parse_and_their_presets_load() -> None:
    from typer.main import get_command

    from vlmtrain.cli import _parse_stage_list, app

    train = get_command(app).commands["train"]  # type: ignore[attr-defined]
    invocations = _train_invocations()
    assert len(invocations) >= 10
    for doc, launcher, args in invocations:
        ctx = train.make_context("train", list(args))  # unknown options or bad values raise here
        assert ctx.params["resume"] in ("auto", "none"), (doc, args)
        for stage in _parse_stage_list(ctx.params["stage"]):
            load_stage_config(stage=stage, overrides=list(ctx.params["set_"]))
        if launcher and launcher[-1] == "launch/slurm/torchrun_exitcode.py":
            from torch.distributed.run import parse_args

            parse_args(
                [*launcher[launcher.index("launch/slurm/torchrun_exitcode.py") + 1 :], "launch/train.py"]
            )
