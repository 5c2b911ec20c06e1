"""The `vlmtrain` command line: thin Typer wrappers over the library; no logic lives here."""

from __future__ import annotations

from pathlib import Path

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
            cfg.name,
            lr["vision"],
            lr["projector"],
            lr["language"],
            cfg.mask.mode,
            f"{cfg.mask.noise_ratio:g}",
            cfg.data.dataset,
            str(cfg.init_from),
        )
    console.print(table)


def _parse_stage_list(values: list[str]) -> list[str]:
    """`--stage 0 --stage 2`, `--stage 0,1` and `--stage 0-3` all work."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if "-" in part and all(x.isdigit() for x in part.split("-", 1)):
                lo, hi = (int(x) for x in part.split("-", 1))
                out.extend(str(i) for i in range(lo, hi + 1))
            elif part:
                out.append(part)
    return out


@app.command()
def train(
    stage: list[str] = typer.Option(
        [], "--stage", "-s", help="Shipped stage(s) to run in order: 3, 0-3 or 0,1,2,3. Repeatable."
    ),
    config: list[Path] = typer.Option(
        [], "--config", "-c", help="Stage config JSON file(s) instead of presets."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key for every stage: key.path=value."
    ),
    run_dir: Path = typer.Option(
        Path("runs/default"), "--run-dir", help="Stage outputs go to RUN_DIR/<stage>/."
    ),
    resume: str = typer.Option(
        "none", "--resume", help="`auto`: continue from the newest complete checkpoint."
    ),
    engine: str | None = typer.Option(None, "--engine", help="deepspeed or fsdp (overrides train.engine)."),
    local_rank: int | None = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train one or more stages; runs under deepspeed, torchrun, srun or as a single process."""
    from vlmtrain.config.load import ConfigError, load_stage_config
    from vlmtrain.dist import init_distributed
    from vlmtrain.train.run import run_stages

    if resume not in ("auto", "none"):
        raise typer.BadParameter("expected auto or none", param_hint="--resume")
    overrides = list(set_) + ([f"train.engine={engine}"] if engine else [])
    try:
        stages = [load_stage_config(stage=s, overrides=overrides) for s in _parse_stage_list(stage)]
        stages += [load_stage_config(config=c, overrides=overrides) for c in config]
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}")
        raise typer.Exit(2) from None
    if not stages:
        raise typer.BadParameter("name at least one --stage or --config", param_hint="--stage")
    ctx = init_distributed()
    run_stages(stages, run_dir, ctx, resume=resume == "auto")


def train_entry() -> None:
    """`launch/train.py`: the train command with its own argv (deepspeed adds --local_rank)."""
    import sys

    app(["train", *sys.argv[1:]], prog_name="launch/train.py")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
