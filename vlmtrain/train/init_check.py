"""A stage with `init_from` takes its model from that checkpoint: refuse a `model` block that says otherwise.

Without this check such keys were ignored silently (a `--set model.language=...` on a later stage trained
the previous stage's LM). Only the keys the config file or `--set` actually wrote are judged (the defaults
name hub ids), against the block that describes the checkpoint:

- a stage output's `stage_config.json` `model` block: a stage with `init_from` records there the block of
  the checkpoint it started from, so the original sources (hub ids, directories) carry down the chain;
- for a model directory without one (saved by `save_pretrained`), a block rebuilt from `vlm_config.json`
  (its sources are unknown, so `vision`, `language` and `tokenizer` cannot be checked against it);
- for a previous stage of the same command that has not run yet, that stage's resolved block.

`attn_backend` (schema.INIT_OVERRIDES) applies on top of the checkpoint; every other key must agree. Config
dicts are compared as the architectures they build (through the transformers config classes), so a partial
`language_config` agrees with the checkpoint when it would build the same LM.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtrain.config.load import STAGE_CONFIG_NAME, ConfigError, stage_config_from_dict
from vlmtrain.config.schema import INIT_OVERRIDES, ModelConfig, StageConfig, given_keys
from vlmtrain.models.backbones.vision import spec_from_dict
from vlmtrain.models.language import language_config_from_dict
from vlmtrain.models.vlm import CONFIG_NAME
from vlmtrain.train.trainer import FINAL

SOURCES = ("vision", "language", "tokenizer")
# Config entries that describe a saved file or runtime switches, not the architecture. `vision_use_head`
# is forced off by the SigLIP family (vlmtrain.models.backbones.vision.siglip) whatever a config says.
NOT_ARCHITECTURE = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "vision_use_head",
}


class InitFromMismatch(ConfigError):
    """A stage's `model` block disagrees with the checkpoint its `init_from` names."""


@dataclass(frozen=True)
class InitReference:
    """The model block that describes what `init_from` supplies."""

    model: ModelConfig
    """The checkpoint's model block (its `attn_backend` is not used: the stage's applies)."""
    where: str
    """The checkpoint directory, or the stage of this run that will write it; used in messages."""
    sources_known: bool = True
    """False for a model directory without stage_config.json: its vision / language / tokenizer are unknown."""


def reference_from_directory(directory: Path) -> InitReference:
    """The block describing a saved model: its stage_config.json `model`, else one rebuilt from vlm_config.json."""
    stage_file = directory / STAGE_CONFIG_NAME
    if stage_file.is_file():
        saved = stage_config_from_dict(json.loads(stage_file.read_text()), source=str(stage_file))
        return InitReference(saved.model, str(directory))
    cfg = json.loads((directory / CONFIG_NAME).read_text())
    model = ModelConfig(
        vision=None,
        vision_config=cfg["vision_config"],
        language=None,
        language_config=cfg["language_config"],
        tokenizer=None,
        vision_feature_layer=cfg["vision_feature_layer"],
        projector_hidden_act=cfg["projector"]["act"],
        pixel_shuffle=cfg.get("pixel_shuffle", 1),
        attn_backend=cfg.get("attn_backend", "sdpa"),
    )
    return InitReference(model, str(directory), sources_known=False)


def effective_model(stage: StageConfig, ref: InitReference) -> ModelConfig:
    """The block the stage actually trains: the checkpoint's, with the stage's INIT_OVERRIDES on top."""
    return dataclasses.replace(ref.model, **{k: getattr(stage.model, k) for k in INIT_OVERRIDES})


def check_model_block(stage: StageConfig, ref: InitReference) -> None:
    """Raise InitFromMismatch naming every given `model` key that disagrees with `ref`, both values, and the fix."""
    problems = disagreements(stage.model, given_keys(stage.model), ref)
    if not problems:
        return
    where = "" if ref.where == stage.init_from else f" ({ref.where})"
    raise InitFromMismatch(
        f"stage {stage.name}: its `model` block disagrees with init_from={stage.init_from!r}{where}, "
        "which supplies the model:\n  "
        + "\n  ".join(problems)
        + f"\nfix: drop these keys from the stage's `model` block (file or --set; only "
        f"{', '.join(INIT_OVERRIDES)} may differ from the checkpoint), or set init_from to null to build the "
        "model from the block"
    )


def disagreements(model: ModelConfig, given: frozenset[str], ref: InitReference) -> list[str]:
    """One line per given key (or config entry) whose value differs from the reference's."""
    out: list[str] = []
    theirs_block = ref.model
    for key in sorted(given - set(INIT_OVERRIDES)):
        mine = getattr(model, key)
        if key in SOURCES:
            if key == "tokenizer":
                if mine is None:  # null: "the LM's tokenizer", which the checkpoint carries anyway
                    continue
                theirs = theirs_block.tokenizer or theirs_block.language
            else:
                theirs = getattr(theirs_block, key)
            if not ref.sources_known:
                if mine is None:  # claims no source (built from the config), as the rebuilt block says
                    continue
                out.append(
                    f"model.{key}: {json.dumps(mine)} here, but {ref.where} records no sources "
                    f"(it has no {STAGE_CONFIG_NAME}), so it cannot be checked"
                )
            elif not _same_source(mine, theirs):
                out.append(_line(f"model.{key}", mine, theirs))
        elif key in ("vision_config", "language_config"):
            out += _config_lines(key, mine, getattr(theirs_block, key))
        elif mine != getattr(theirs_block, key):
            out.append(_line(f"model.{key}", mine, getattr(theirs_block, key)))
    return out


def _line(key: str, mine: Any, theirs: Any) -> str:
    return f"{key}: {json.dumps(mine, default=str)} here, {json.dumps(theirs, default=str)} in the checkpoint"


def _same_source(mine: str | None, theirs: str | None) -> bool:
    """Equal strings, or two spellings of one existing local directory."""
    if mine == theirs:
        return True
    if mine is None or theirs is None:
        return False
    a, b = Path(mine), Path(theirs)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _architecture(key: str, config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as the full config it builds, without file / runtime entries."""
    data = {k: v for k, v in config.items() if k not in NOT_ARCHITECTURE and not k.startswith("_")}
    if key == "vision_config":
        built = spec_from_dict(data).config.to_dict()  # the family's config class (model_type default siglip)
    else:
        built = language_config_from_dict(data).to_dict()
    return {k: v for k, v in built.items() if k not in NOT_ARCHITECTURE and not k.startswith("_")}


def _config_lines(key: str, mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> list[str]:
    if mine is None or theirs is None:
        return [] if mine is theirs else [_line(f"model.{key}", mine, theirs)]
    a, b = _architecture(key, mine), _architecture(key, theirs)
    return [
        _line(f"model.{key}.{entry}", a.get(entry), b.get(entry))
        for entry in sorted(set(a) | set(b))
        if a.get(entry) != b.get(entry)
    ]


def resolve_init(stage: StageConfig, run_dir: Path) -> Path | None:
    """`init_from` as a directory: a previous stage's output under the run directory, or a path."""
    if stage.init_from is None:
        return None
    candidates = [run_dir / stage.init_from / FINAL, Path(stage.init_from)]
    for c in candidates:
        if (c / CONFIG_NAME).is_file():
            return c
    raise FileNotFoundError(
        f"stage {stage.name}: init_from={stage.init_from!r} found no model at {candidates[0]} or {candidates[1]}; "
        f"run stage {stage.init_from!r} first (same --run-dir) or point init_from at a saved model directory"
    )


def resolve_model(
    stage: StageConfig, run_dir: Path, planned: Mapping[str, ModelConfig] | None = None
) -> StageConfig:
    """The stage as it trains: with `init_from`, its `model` block is checked against the checkpoint's
    (InitFromMismatch) and replaced by it, so the stage_config.json it writes says what the model is.

    `planned` holds the resolved blocks of earlier stages of this command that have not run yet: an
    `init_from` naming one is checked against that block (the directory does not exist yet). Reads JSON only.
    """
    if stage.init_from is None:
        return stage
    if planned is not None and stage.init_from in planned:
        ref = InitReference(
            planned[stage.init_from], f"stage {stage.init_from}'s output, trained earlier in this run"
        )
    else:
        ref = reference_from_directory(resolve_init(stage, run_dir))  # type: ignore[arg-type]
    check_model_block(stage, ref)
    return dataclasses.replace(stage, model=effective_model(stage, ref))
