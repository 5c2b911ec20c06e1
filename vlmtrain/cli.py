"""The `vlmtrain` command line: thin Typer wrappers over the library; no logic lives here."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="vlmtrain: train small vision-language models (SigLIP -> MLP projector -> Qwen2) stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Subcommands: data (shard), training (train), evaluation (eval, caption, ask), export, demo."""
    if version:
        from vlmtrain import __version__

        console.print(f"vlmtrain {__version__}")
        raise typer.Exit()


@app.command()
def stages() -> None:
    """List the shipped stage presets: trainable groups, learning rates, mask and data."""
    from rich.table import Table

    from vlmtrain.config.load import load_stage_config

    table = Table(title="Shipped stage configs (vlmtrain/stages/*.json)")
    for col in ("stage", "vision", "projector", "language", "mask", "noise", "data", "init_from"):
        table.add_column(col)
    for i in range(4):
        cfg = load_stage_config(i)
        lr = {g: (f"{m.lr:g}" if m.trainable else "frozen") for g, m in cfg.modules.items()}
        table.add_row(
            cfg.name, lr["vision"], lr["projector"], lr["language"], cfg.mask.mode,
            f"{cfg.mask.noise_ratio:g}", cfg.data.dataset, str(cfg.init_from),
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
