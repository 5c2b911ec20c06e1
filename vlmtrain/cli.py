"""The `vlmtrain` command line: thin Typer wrappers over the library; no logic lives here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import typer

from vlmtrain.demo.run import DemoConfig
from vlmtrain.logging import make_console

app = typer.Typer(
    help="vlmtrain: train small vision-language models (SigLIP -> MLP projector -> Qwen2) stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = make_console()


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


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/] {err}")
    raise typer.Exit(1) from None


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
def shard(
    input: Path = typer.Argument(
        ..., help="Annotation file: LLaVA JSON/JSONL, COCO captions, Karpathy split, parquet, JSONL, CSV."
    ),
    fmt: str = typer.Option(..., "--format", "-f", help="llava, coco, karpathy, pathvqa, jsonl or csv."),
    images: Path | None = typer.Option(
        None, "--images", help="Image root; paths in INPUT are relative to it."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder for the tar shards and manifest.json."),
    split: str | None = typer.Option(
        None, "--split", help="karpathy: train, val or test (restval counts as train)."
    ),
    shard_size: int = typer.Option(1000, "--shard-size", help="Input records per shard."),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Downscale so the shorter side is PX (JPEG q95)."
    ),
    workers: int = typer.Option(1, "--workers", help="Processes writing shards in parallel."),
    caption_prompt: str | None = typer.Option(
        None, "--caption-prompt", help="Prompt stored with caption samples."
    ),
    image_column: str = typer.Option("image", "--image-column", help="jsonl/csv: the image path column."),
    text_columns: list[str] = typer.Option(
        ["caption"], "--text-columns", help="jsonl/csv: caption column(s)."
    ),
    question_column: str | None = typer.Option(
        None, "--question-column", help="jsonl/csv: VQA question column."
    ),
    answer_column: str | None = typer.Option(None, "--answer-column", help="jsonl/csv: VQA answer column."),
    max_image_pixels: int | None = typer.Option(None, "--max-image-pixels", help="Decompression-bomb limit."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the record order: shards hold a seeded random permutation of all records."
    ),
    keep_order: bool = typer.Option(
        False, "--keep-order", help="Keep input order instead (shard i = records i*N..(i+1)*N-1)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Convert an image-text corpus into WebDataset tar shards plus manifest.json; bad records are skipped and counted."""
    from vlmtrain.data import shard as shard_mod
    from vlmtrain.data.formats.base import FormatError

    kwargs = {}
    if caption_prompt is not None:
        kwargs["caption_prompt"] = caption_prompt
    if max_image_pixels is not None:
        kwargs["max_image_pixels"] = max_image_pixels
    try:
        summary = shard_mod.shard(
            input,
            fmt,
            images,
            out,
            split=split,
            shard_size=shard_size,
            image_size=image_size,
            workers=workers,
            image_column=image_column,
            text_columns=tuple(text_columns),
            question_column=question_column,
            answer_column=answer_column,
            progress=progress,
            seed=seed,
            keep_order=keep_order,
            **kwargs,
        )
    except (FormatError, ValueError, FileNotFoundError, NotADirectoryError, shard_mod.ManifestError) as err:
        _fail(err)
    shard_mod.print_summary(summary)


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
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show tracebacks for config and preflight errors too (they print one line each).",
    ),
    local_rank: int | None = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train one or more stages; runs under deepspeed, torchrun, srun or as a single process.

    Before any model loads, a preflight checks every stage's data, init_from, DeepSpeed config, the run
    directory and (offline) the hub cache, and lists every problem found (exit 2)."""
    from vlmtrain.config.load import ConfigError, load_stage_config
    from vlmtrain.dist import init_distributed
    from vlmtrain.train.failfast import fail_fast
    from vlmtrain.train.run import run_stages

    if resume not in ("auto", "none"):
        raise typer.BadParameter("expected auto or none", param_hint="--resume")
    overrides = list(set_) + ([f"train.engine={engine}"] if engine else [])
    try:
        stages = [load_stage_config(stage=s, overrides=overrides) for s in _parse_stage_list(stage)]
        stages += [load_stage_config(config=c, overrides=overrides) for c in config]
    except ConfigError as err:
        if debug:
            import traceback

            traceback.print_exc()
        console.print(f"[red]config error:[/] {err}")
        raise typer.Exit(2) from None
    if not stages:
        raise typer.BadParameter("name at least one --stage or --config", param_hint="--stage")
    ctx = init_distributed()
    with fail_fast(ctx, debug=debug):  # any failure ends every rank promptly with a non-zero status
        run_stages(stages, run_dir, ctx, resume=resume == "auto")


@app.command()
def plan(
    stage: list[str] = typer.Option(
        [], "--stage", "-s", help="Shipped stage(s) to plan: 3, 0-3 or 0,1,2,3 (default 0-3). Repeatable."
    ),
    config: list[Path] = typer.Option(
        [], "--config", "-c", help="Stage config JSON file(s), after the presets."
    ),
    gpus: int = typer.Option(1, "--gpus", help="GPUs the job runs on (ZeRO-2 shards over them)."),
    gpu: str = typer.Option(
        "A800", "--gpu", help="GPU of the peak table (A800, H100, H100 PCIe, H200, ...)."
    ),
    mfu: float = typer.Option(0.4, "--mfu", help="Model FLOPs utilisation the estimate assumes."),
    peak_tflops: float | None = typer.Option(
        None, "--peak-tflops", help="Dense TFLOP/s of one GPU, instead of the table's."
    ),
    text_tokens: list[str] = typer.Option(
        [], "--text-tokens", help="STAGE=PROMPT,ANSWER text tokens per sample, replacing the estimate."
    ),
    gpu_memory_gib: float | None = typer.Option(
        None,
        "--gpu-memory-gib",
        help="Memory of one GPU that micro_batch_size auto plans for (default: the table's).",
    ),
    interconnect: str = typer.Option(
        "ib-ndr",
        "--interconnect",
        help="Link between nodes: nvlink, ib-ndr, ib-hdr or 100gbe (within a node: NVLink).",
    ),
) -> None:
    """Per stage: samples, steps, tokens, FLOPs, GPU-hours, memory and communication per GPU, before anything runs.

    Warns when a step would be bound by communication (--interconnect names the link between nodes)."""
    from vlmtrain.config.load import ConfigError, load_stage_config
    from vlmtrain.config.schema import ValidationError
    from vlmtrain.train.plan import parse_text_tokens, plan_stages, plan_tables, plan_warnings

    try:
        stages = [load_stage_config(stage=s) for s in _parse_stage_list(stage or ([] if config else ["0-3"]))]
        stages += [load_stage_config(config=c) for c in config]
        texts = parse_text_tokens(text_tokens)
        plans, name, peak = plan_stages(
            stages, gpus, gpu, mfu, texts, peak_tflops, gpu_memory_gib, interconnect
        )
    except (ConfigError, ValidationError, ValueError, FileNotFoundError) as err:
        _fail(err)
    for table in plan_tables(plans, gpus, name, peak, mfu):
        console.print(table)
    for warning in plan_warnings(plans):
        console.print(f"[yellow]warning:[/] {warning}")


eval_app = typer.Typer(
    help="Evaluate a trained model: captioning metrics or VQA accuracy.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")


def _gen_config(
    max_new_tokens: int, strategy: str, num_beams: int, temperature: float, top_p: float, seed: int
):
    from vlmtrain.eval.generate import GenerationConfig

    if strategy not in ("greedy", "beam", "sample"):
        raise typer.BadParameter("expected greedy, beam or sample", param_hint="--strategy")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        strategy=strategy,  # type: ignore[arg-type]
        num_beams=num_beams,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


CheckpointOpt = typer.Option(..., "--checkpoint", help="A stage output, e.g. runs/default/stage3/final.")
MaxNewOpt = typer.Option(64, "--max-new-tokens", help="Most tokens generated per answer.")
StrategyOpt = typer.Option("greedy", "--strategy", help="greedy, beam or sample.")
BeamsOpt = typer.Option(3, "--num-beams", help="Beams for --strategy beam.")
TempOpt = typer.Option(1.0, "--temperature", help="Sampling temperature.")
TopPOpt = typer.Option(1.0, "--top-p", help="Nucleus sampling mass.")
SeedOpt = typer.Option(0, "--seed", help="Sampling seed.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
MaskOpt = typer.Option(
    None, "--mask", help="Prefill mask: prefix or causal (default: the one the model was trained with)."
)


def _mask(mask: str | None) -> str | None:
    if mask not in (None, "prefix", "causal"):
        raise typer.BadParameter("expected prefix or causal", param_hint="--mask")
    return mask


@eval_app.command("caption")
def eval_caption_cmd(
    checkpoint: Path = CheckpointOpt,
    data: str = typer.Option(..., "--data", help="Caption shards: a manifest.json or a brace pattern."),
    out: Path = typer.Option(
        ..., "--out", help="Folder for predictions.json, references.json, metrics.json."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Caption prompt (default: each sample's own)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N images."),
    spice: bool = typer.Option(False, "--spice", help="Also SPICE (needs its Stanford models installed)."),
    max_new_tokens: int = MaxNewOpt,
    strategy: str = StrategyOpt,
    num_beams: int = BeamsOpt,
    temperature: float = TempOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    device: str | None = DeviceOpt,
    mask: str | None = MaskOpt,
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) on caption shards, e.g. a Karpathy test split."""
    from vlmtrain.eval.run import eval_caption

    gen = _gen_config(max_new_tokens, strategy, num_beams, temperature, top_p, seed)
    try:
        eval_caption(
            checkpoint,
            data,
            out,
            prompt,
            gen,
            batch_size,
            limit,
            spice,
            _device(device),
            console,
            _mask(mask),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)


@eval_app.command("vqa")
def eval_vqa_cmd(
    checkpoint: Path = CheckpointOpt,
    data: str = typer.Option(
        ..., "--data", help="VQA shards (question = first human turn, answer = gpt turn)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder for predictions.json, references.json, metrics.json."
    ),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N questions."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens"),
    strategy: str = StrategyOpt,
    num_beams: int = BeamsOpt,
    device: str | None = DeviceOpt,
    mask: str | None = MaskOpt,
) -> None:
    """Yes/no accuracy, open-ended exact match and token F1 (PathVQA style) on VQA shards."""
    from vlmtrain.eval.run import eval_vqa

    gen = _gen_config(max_new_tokens, strategy, num_beams, 1.0, 1.0, 0)
    try:
        eval_vqa(checkpoint, data, out, gen, batch_size, limit, _device(device), console, _mask(mask))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(err)


@eval_app.command("lmms")
def eval_lmms_cmd(
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="A stage output, e.g. runs/default/stage3/final (not with --setup/--prefetch).",
    ),
    tasks: list[str] = typer.Option(
        [], "--tasks", help="lmms-eval tasks: mme,pope,... (repeatable); local task YAMLs via --include-path."
    ),
    out: Path = typer.Option(
        Path("lmms_out"), "--out", help="Folder for lmms-eval's own result files, its log and scores.json."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N documents of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions generated together."),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="A folder of extra lmms-eval task YAMLs (local datasets)."
    ),
    env: Path | None = typer.Option(
        None, "--env", help="lmms-eval's venv (default: $VLMTRAIN_LMMS_ENV or ~/.cache/vlmtrain/lmms-venv)."
    ),
    setup: bool = typer.Option(False, "--setup", help="Build lmms-eval's venv (once) and exit."),
    torch_index_url: str | None = typer.Option(
        None,
        "--torch-index-url",
        help="--setup: the index torch/torchvision come from (e.g. PyTorch's CPU one).",
    ),
    prefetch: bool = typer.Option(
        False, "--prefetch", help="Download the tasks' datasets into the Hugging Face cache and exit."
    ),
    device: str | None = DeviceOpt,
) -> None:
    """lmms-eval benchmarks (MME, POPE, TextVQA, ...) answered by the checkpoint, as `vlmtrain ask` answers.

    lmms-eval runs in its own environment (build it with --setup); datasets come from the Hugging Face cache,
    so HF_DATASETS_OFFLINE=1 works once they are there (--prefetch)."""
    from vlmtrain.eval.lmms import LmmsError, eval_lmms, run_lmms
    from vlmtrain.eval.lmms_env import LmmsEnvError, setup_env

    names = [t.strip() for value in tasks for t in value.split(",") if t.strip()]
    try:
        if setup:
            setup_env(env, torch_index_url, log=console.print)
            return
        if not names:
            raise typer.BadParameter("name at least one task", param_hint="--tasks")
        if prefetch:
            run_lmms(lambda _: [], names, out, include_path=include_path, env=env, prefetch=True)
            console.print(f"the datasets of {', '.join(names)} are in the Hugging Face cache")
            return
        if checkpoint is None:
            raise typer.BadParameter("name the checkpoint to evaluate", param_hint="--checkpoint")
        eval_lmms(checkpoint, names, out, limit, batch_size, _device(device), include_path, env, console)
    except (FileNotFoundError, FileExistsError, ValueError, LmmsError, LmmsEnvError) as err:
        _fail(err)


def _load_images(paths: list[Path], transform):
    """uint8 images resized by the model's own transform (`model.image_transform`); the model normalizes them."""
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                out.append(transform.pixels(img))
        except (OSError, ValueError) as err:
            _fail(ValueError(f"{path}: cannot read this image ({err})"))
    return out


def _generator(checkpoint: Path, device: str | None, gen, mask: str | None = None):
    """A trained model, its tokenizer and a Generator prefilling with `mask` (default: the trained one)."""
    import dataclasses

    from vlmtrain.eval.generate import Generator
    from vlmtrain.eval.run import load_trained

    try:
        model, tokenizer, mode = load_trained(checkpoint, _device(device))
    except FileNotFoundError as err:
        _fail(err)
    return model, Generator(model, tokenizer, dataclasses.replace(gen, mask_mode=_mask(mask) or mode))


CaptionPromptOpt = typer.Option(
    None, "--prompt", help="Instruction (default: the caption prompt of the shards)."
)


@app.command()
def caption(
    images: list[Path] = typer.Argument(..., help="Image files."),
    checkpoint: Path = CheckpointOpt,
    prompt: str | None = CaptionPromptOpt,
    max_new_tokens: int = MaxNewOpt,
    strategy: str = StrategyOpt,
    num_beams: int = BeamsOpt,
    device: str | None = DeviceOpt,
    mask: str | None = MaskOpt,
) -> None:
    """Caption image files."""
    import torch

    from vlmtrain.data.prompt import CAPTION_PROMPT, question_messages

    gen = _gen_config(max_new_tokens, strategy, num_beams, 1.0, 1.0, 0)
    model, generator = _generator(checkpoint, device, gen, mask)
    pixels = torch.stack(_load_images(images, model.image_transform))
    prompts = [generator.prompt(question_messages(prompt or CAPTION_PROMPT), True)] * len(images)
    for path, ids in zip(images, generator.generate(prompts, pixels), strict=True):
        console.print(f"[bold]{path}[/]: {generator.decode(ids)}")


@app.command()
def ask(
    image: Path = typer.Argument(..., help="Image file."),
    question: str | None = typer.Argument(
        None, help="Question; omit it for a multi-turn chat in the terminal."
    ),
    checkpoint: Path = CheckpointOpt,
    max_new_tokens: int = MaxNewOpt,
    device: str | None = DeviceOpt,
    mask: str | None = MaskOpt,
) -> None:
    """Ask about an image; without a question, chat turn by turn (empty line or Ctrl-D ends)."""
    from vlmtrain.eval.generate import GenerationConfig

    model, generator = _generator(checkpoint, device, GenerationConfig(max_new_tokens=max_new_tokens), mask)
    pixels = _load_images([image], model.image_transform)[0][None]
    messages: list[dict[str, str]] = []

    def answer(q: str) -> str:
        messages.append({"role": "user", "content": q})
        text = generator.decode(generator.generate([generator.prompt(messages, True)], pixels)[0])
        messages.append({"role": "assistant", "content": text})
        return text

    if question is not None:
        console.print(answer(question))
        return
    console.print(f"Chatting about [bold]{image}[/]; an empty line ends.")
    while True:
        try:
            q = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if not q:
            break
        console.print(f"[bold green]model>[/] {answer(q)}")


@app.command()
def export(
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(..., "--out", help="Output folder (new or empty)."),
    fmt: str = typer.Option(
        "auto",
        "--format",
        help="vlmtrain: LLaVA subclass shipped in the folder (trust_remote_code=True) that keeps the trained "
        "mask, so transformers equals vlmtrain. llava: stock LlavaForConditionalGeneration, always causal "
        "(for vLLM, llama.cpp converters). auto: llava for a causal-trained model it can express, else vlmtrain.",
    ),
) -> None:
    """Export a trained model to a folder transformers loads (AutoModelForImageTextToText, AutoProcessor)."""
    from vlmtrain.export import FORMATS, export_hf

    if fmt not in FORMATS:
        hint = " (`hf` is now `llava`)" if fmt == "hf" else ""
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}{hint}", param_hint="--format")
    try:
        path = export_hf(checkpoint, out, fmt)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(err)
    first = (path / "README.md").read_text().splitlines()[0].lstrip("# ")
    console.print(f"exported to {path}: {first} (see its README.md)")


def _positive_ints(text: str, n: int, hint: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or min(values) < 1:
        raise typer.BadParameter(f"expected {n} positive integers separated by commas", param_hint=hint)
    return values


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


# The demo's defaults live in DemoConfig only (a light import: no torch); the options show them. Read off the
# fields, not an instance: building one validates it, which imports numpy and PIL.
_DEMO = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(DemoConfig)})


@app.command()
def demo(
    out: Path = typer.Option(_DEMO.out, "--out", help="Everything is written under this folder."),
    n_train: int = typer.Option(_DEMO.n_train, "--n-train", min=1, help="Synthetic training images."),
    n_test: int = typer.Option(_DEMO.n_test, "--n-test", min=1, help="Synthetic test images."),
    mask: str = typer.Option(
        _DEMO.mask, "--mask", help="Mask of stages 1-3: prefix (the paper) or causal (LLaVA)."
    ),
    compare_masks: bool = typer.Option(
        False, "--compare-masks", help="Also train the other mask; table + DIR/compare_masks.png."
    ),
    compare_captions: bool = typer.Option(
        False,
        "--compare-captions",
        help="Also pre-train stages 0-2 on short captions; table + DIR/compare_captions.png.",
    ),
    compare_stages: bool = typer.Option(
        False,
        "--compare-stages",
        help="Also train without stages 0-1 (stage 2 from the warm start, same total steps); table + plot.",
    ),
    steps: str = typer.Option(_csv(_DEMO.stage_steps), "--steps", help="Optimizer steps of stages 0,1,2,3."),
    warmstart_steps: str = typer.Option(
        _csv((_DEMO.lm_warmstart_steps, _DEMO.vision_warmstart_steps)),
        "--warmstart-steps",
        help="Warm-start steps: LM,vision.",
    ),
    seed: int = typer.Option(_DEMO.seed, "--seed"),
    tweak: list[str] = typer.Option(
        [],
        "--tweak",
        help="FIELD=VALUE override of a DemoConfig field (docs/demo.md's experiments); repeatable.",
    ),
) -> None:
    """The whole framework on a CPU in minutes: synthetic data, shards, four stages, evaluation vs baselines."""
    from vlmtrain.demo.run import apply_tweaks, run_demo

    _mask(mask)
    stage_steps = _positive_ints(steps, 4, "--steps")
    lm_steps, vision_steps = _positive_ints(warmstart_steps, 2, "--warmstart-steps")
    cfg = DemoConfig(
        out=out,
        n_train=n_train,
        n_test=n_test,
        seed=seed,
        mask=mask,
        compare_masks=compare_masks,
        compare_captions=compare_captions,
        compare_stages=compare_stages,
        stage_steps=stage_steps,  # type: ignore[arg-type]
        lm_warmstart_steps=lm_steps,
        vision_warmstart_steps=vision_steps,
    )
    try:
        cfg = apply_tweaks(cfg, tweak)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--tweak") from None
    from vlmtrain.config.load import ConfigError

    try:
        run_demo(cfg, console)
    except ConfigError as err:  # e.g. preflight: a finished stage of --out was trained with other settings
        console.print(f"[red]config error:[/] {err}")
        raise typer.Exit(2) from None


def train_entry() -> None:
    """`launch/train.py`: the train command with its own argv (deepspeed adds --local_rank)."""
    import sys

    app(["train", *sys.argv[1:]], prog_name="launch/train.py")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
