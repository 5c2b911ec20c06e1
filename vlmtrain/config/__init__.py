"""Validated configuration: dataclasses for model, data, optimizer and stage, plus JSON loading."""

from vlmtrain.config.load import ConfigError, apply_overrides, load_stage_config, stage_config_from_dict
from vlmtrain.config.schema import (
    MODULE_GROUPS,
    BatchConfig,
    DataConfig,
    MaskConfig,
    ModelConfig,
    ModuleGroupConfig,
    OptimConfig,
    StageConfig,
    TrainConfig,
    ValidationConfig,
)

__all__ = [
    "MODULE_GROUPS",
    "BatchConfig",
    "ConfigError",
    "DataConfig",
    "MaskConfig",
    "ModelConfig",
    "ModuleGroupConfig",
    "OptimConfig",
    "StageConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_stage_config",
    "stage_config_from_dict",
]
