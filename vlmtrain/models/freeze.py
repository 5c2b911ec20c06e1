"""Apply a stage's trainable/frozen module groups (LoRA adapters included) with one function; show the table."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table

from vlmtrain.config.schema import ModuleGroupConfig
from vlmtrain.models.lora import LoraBase, LoraState, adapter_parameters, attach_lora
from vlmtrain.models.vlm import VisionLanguageModel


def apply_trainability(
    model: VisionLanguageModel,
    modules: Mapping[str, ModuleGroupConfig],
    seed: int = 0,
    lora_base: LoraBase | None = None,
) -> LoraState | None:
    """Set `requires_grad` per group as the config declares; parameters no forward reaches stay frozen.

    A group with `lora` freezes its weights and gets trainable PEFT adapters (vlmtrain.models.lora, seeded by
    `seed`; `lora_base` records the base's source for the stage output); returns the attached adapters.
    """
    groups = model.module_groups()
    unknown = sorted(set(modules) - set(groups))
    if unknown:
        raise ValueError(f"unknown module group(s) {unknown}; the model has {sorted(groups)}")
    missing = sorted(set(groups) - set(modules))
    if missing:
        raise ValueError(f"module group(s) {missing} not declared; a stage names every group")
    for name, module in groups.items():
        module.requires_grad_(modules[name].trainable and modules[name].lora is None)
    for p in model.unused_parameters():
        p.requires_grad_(False)
    return attach_lora(model, modules, seed, lora_base)


TABLE_COLUMNS = ("group", "status", "params", "trainable", "adapters", "lr")


def trainability_rows(
    model: VisionLanguageModel, modules: Mapping[str, ModuleGroupConfig]
) -> list[tuple[str, str, int, int, int, float]]:
    """(group, Frozen|TRAINABLE|LoRA r=N, base parameters, trainable parameters, LoRA adapter parameters, lr)."""
    rows = []
    for name, module in model.module_groups().items():
        adapters = {id(p) for p in adapter_parameters(module)}
        params = list(module.parameters())
        n_adapters = sum(p.numel() for p in params if id(p) in adapters)
        total = sum(p.numel() for p in params) - n_adapters
        trainable = sum(p.numel() for p in params if p.requires_grad)
        lora = modules[name].lora
        if n_adapters:
            status = f"LoRA r={lora.r}" if lora is not None else "LoRA"
        else:
            status = "TRAINABLE" if trainable else "Frozen"
        rows.append((name, status, total, trainable, n_adapters, modules[name].lr))
    return rows


def trainability_table(
    model: VisionLanguageModel, modules: Mapping[str, ModuleGroupConfig], title: str
) -> Table:
    table = Table(title=title)
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col in ("group", "status") else "right")
    for name, status, total, trainable, adapters, lr in trainability_rows(model, modules):
        style = "dim" if status == "Frozen" else "bold green"
        table.add_row(name, status, f"{total:,}", f"{trainable:,}", f"{adapters:,}", f"{lr:g}", style=style)
    return table
