"""Apply a stage's trainable/frozen module groups with one function, and show them as a table."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table

from vlmtrain.config.schema import ModuleGroupConfig
from vlmtrain.models.vlm import VisionLanguageModel


def apply_trainability(model: VisionLanguageModel, modules: Mapping[str, ModuleGroupConfig]) -> None:
    """Set `requires_grad` per group as the config declares; parameters no forward reaches stay frozen."""
    groups = model.module_groups()
    unknown = sorted(set(modules) - set(groups))
    if unknown:
        raise ValueError(f"unknown module group(s) {unknown}; the model has {sorted(groups)}")
    missing = sorted(set(groups) - set(modules))
    if missing:
        raise ValueError(f"module group(s) {missing} not declared; a stage names every group")
    for name, module in groups.items():
        module.requires_grad_(modules[name].trainable)
    for p in model.unused_parameters():
        p.requires_grad_(False)


def trainability_rows(
    model: VisionLanguageModel, modules: Mapping[str, ModuleGroupConfig]
) -> list[tuple[str, str, int, int, float]]:
    """(group, Frozen|TRAINABLE, parameters, trainable parameters, lr) per group."""
    rows = []
    for name, module in model.module_groups().items():
        params = list(module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        status = "TRAINABLE" if trainable else "Frozen"
        rows.append((name, status, total, trainable, modules[name].lr))
    return rows


def trainability_table(
    model: VisionLanguageModel, modules: Mapping[str, ModuleGroupConfig], title: str
) -> Table:
    table = Table(title=title)
    for col, justify in (
        ("group", "left"),
        ("status", "left"),
        ("params", "right"),
        ("trainable", "right"),
        ("lr", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, status, total, trainable, lr in trainability_rows(model, modules):
        style = "bold green" if status == "TRAINABLE" else "dim"
        table.add_row(name, status, f"{total:,}", f"{trainable:,}", f"{lr:g}", style=style)
    return table
