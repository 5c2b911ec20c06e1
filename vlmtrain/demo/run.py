"""`vlmtrain demo`: synthetic data -> shards -> four stages through the DeepSpeed engine -> evaluation.

Everything runs on a laptop CPU in minutes with tiny SigLIP / Qwen2 models of the real classes; the stage
semantics (masks, stage-0 noise, trainable groups, LR ratios between groups and stages) are the shipped
presets', with batch, step counts and one global LR scale adapted to the tiny models.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vlmtrain.config.load import read_json, shipped_stage_path, stage_config_from_dict
from vlmtrain.config.schema import StageConfig
from vlmtrain.demo.compare import Comparison, as_json, comparison_rows, comparison_table, plot_comparison
from vlmtrain.logging import make_console

# 48 px / patch 8 gives 6x6 = 36 image tokens, so each cell of the scene's 3x3 grid is exactly 2x2 patches
# and a shape is always split the same way. At 64 px (64 tokens, cells of 2.67 patches) the same budget
# learned shapes at chance level (docs/demo.md has the measurements).
VISION = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 48,
    "patch_size": 8,
    "num_channels": 3,
}


def language_config(
    vocab_size: int, width: int = 128, layers: int = 3, init_std: float = 0.08
) -> dict[str, Any]:
    """The tiny Qwen2's config. `init_std` replaces Qwen2's initializer_range of 0.02, a scale meant for its
    real widths (896 and up): at width 128 the initial attention logits are 16x smaller than at 0.08 (they
    grow with the square of the scale), so attention starts nearly uniform and learning to look something
    up in the context (which shape is red? is there a circle?) stalls; the demo at 0.02 answers yes/no
    questions at chance (docs/demo.md)."""
    return {
        "initializer_range": init_std,
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    }


LM_READS_RECAP = ("recaps", "captions", "conversations")
"""What DemoConfig.lm_reads_recap may name: the kinds of warm-start texts about an image."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and lengths of the demo; the defaults take about 7 minutes on 2 AVX512 CPU cores (427 s measured),
    and stage steps took about 1.7x as long on an AVX2-only one (docs/demo.md)."""

    out: Path = Path("demo_out")
    n_train: int = 2000
    n_test: int = 200
    seed: int = 0
    mask: str = "prefix"
    """Mask of stages 1-3: `prefix` (the paper) or `causal` (LLaVA's baseline; stage 0 then has no noise)."""
    compare_masks: bool = False
    """Also train the other mask and compare (the paper's prefix-vs-causal comparison)."""
    compare_captions: bool = False
    """Also train stages 0-2 on short human-style captions instead of recaps (the paper's finding 2)."""
    compare_stages: bool = False
    """Also train without stages 0-1, stage 2 from the warm start with their steps (the paper's finding 3)."""
    stage_steps: tuple[int, int, int, int] = (60, 60, 300, 1200)
    lm_warmstart_steps: int = 300
    vision_warmstart_steps: int = 300
    global_batch: int = 32
    micro_batch: int = 32
    lr_scale: tuple[int, int, int, int] = (20, 20, 20, 60)
    """Per stage 0-3, its LRs are the paper's times this factor, so the ratios between groups are kept. Stage 3
    gets 3x the others' factor: the best VQA of 1x, 3x and 6x with 1 or 13 conversations per image (with 13,
    the best CIDEr too; docs/demo.md)."""
    vocab_size: int = 700
    eval_batch: int = 50
    examples: int = 4
    stages_only: tuple[int, ...] = field(default=(0, 1, 2, 3))
    dense_warmstart: bool = True
    """Warm-start the vision tower with the per-patch cell objective too (demo.warmstart); False: contrastive only."""
    cell_position: bool = True
    """The per-patch objective also predicts which grid cell a patch is in (so features say where they are)."""
    train_turns: tuple[int, int] = (2, 4)
    """Questions per training image's conversation, min,max (stage 3's data; the test questions do not change)."""
    conversations: int = 13
    """Independently drawn conversations per training image in stage 3's data. 13 is about how often 800 x 32
    stage-3 samples draw each of 2,000 images (the stage-3 length it was chosen at; 1,200 steps see each
    conversation about 1.4 times): fresh questions instead of memorised answers (1: the same conversation
    every epoch; docs/demo.md)."""
    lm_width: int = 128
    """Hidden size of the tiny Qwen2 (4 query / 2 key-value heads, MLP 2x): a multiple of 8."""
    lm_layers: int = 3
    """Decoder layers of the tiny Qwen2."""
    tokenizer_chats: bool = True
    """Train the BPE tokenizer on the warm-start chats as the template renders them (False: on the bare texts
    of their turns, where "user", "assistant" and a line-initial answer never occur, so they are spelled out
    letter by letter: a conversation takes 1.5x the tokens)."""
    tight_rows: bool = True
    """The stages' max_length (and stage 3's packed row width) is the longest sample rounded up to 32 (192
    tokens at the default); False: 512. A CPU computes a packed row's attention densely."""
    caption_turn: str = "consensus"
    """The short caption a stage-3 caption opening answers with: `consensus` (the image's reference most like
    its other four) or `random` (any of the five; docs/demo.md)."""
    lm_init_std: float = 0.08
    """Standard deviation of the tiny Qwen2's initial weights (Qwen2's initializer_range), about width**-0.5."""
    lm_reads_recap: str = "none"
    """The LM warm-start texts about an image that follow its recap, where the stages put the image: `none`, or
    a comma-separated subset of recaps, captions, conversations. Reading the recap teaches the LM to answer
    from (and copy) a description in front of it, as a pretrained LM does. All three: VQA +4.3, +2.2 and -1.6
    points against `none` at seeds 0-2 and CIDEr -8.7 on average, within the seed noise (docs/demo.md)."""
    patch_size: int = 8
    """SigLIP patch size on the 48 px images: 8 gives 36 image tokens (2x2 per grid cell), 16 gives 9 (one per cell)."""

    def __post_init__(self) -> None:
        # Imported here: the CLI builds a DemoConfig for its --help defaults and should not pay numpy and PIL.
        from vlmtrain.demo.corpus import check_caption_turn, check_conversations, check_train_turns
        from vlmtrain.demo.scenes import GRID

        side, rem = divmod(VISION["image_size"], self.patch_size)
        if rem or side % GRID:
            raise ValueError(
                f"patch_size {self.patch_size}: the {VISION['image_size']} px image must split into whole patches "
                f"and every grid cell into whole patches; use 8 or 16"
            )
        check_train_turns(self.train_turns)
        check_conversations(self.conversations)
        check_caption_turn(self.caption_turn)
        if self.lm_init_std <= 0:
            raise ValueError(f"lm_init_std {self.lm_init_std}: give a positive standard deviation, e.g. 0.08")
        if len(self.lr_scale) != 4 or min(self.lr_scale) <= 0:
            raise ValueError(
                f"lr_scale {self.lr_scale}: give one positive factor per stage 0-3, e.g. 20,20,20,60"
            )
        if self.lm_reads_recap != "none" and not set(self.lm_reads_recap.split(",")) <= set(LM_READS_RECAP):
            raise ValueError(
                f"lm_reads_recap {self.lm_reads_recap!r}: use none or a comma-separated subset of "
                f"{', '.join(LM_READS_RECAP)}"
            )
        if self.lm_width % 8 or self.lm_width < 8 or self.lm_layers < 1:
            raise ValueError(
                f"lm_width {self.lm_width}, lm_layers {self.lm_layers}: the width must be a positive multiple "
                "of 8 (4 heads of an even size for the rotary embedding) and the layers at least 1"
            )


DEMO_CONFIG_NAME = "demo_config.json"
"""Written into the demo's `--out` when it starts: the settings its corpus, warm starts and stages are built with."""

# Fields that only add or show results: a finished demo can be re-run with other values in the same --out.
_RERUN_FREE = ("out", "compare_masks", "compare_captions", "compare_stages", "examples")


def demo_settings(cfg: DemoConfig) -> dict[str, Any]:
    """The plain-JSON fields of `cfg` that decide what an --out folder holds (all but _RERUN_FREE)."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _RERUN_FREE}))


def check_same_settings(cfg: DemoConfig) -> None:
    """Raise ConfigError, before any work, when `cfg.out` holds a demo built with other settings.

    Re-running the same command continues an interrupted demo (finished stages are skipped); a run with other
    settings (steps, sizes, any --tweak, the warm starts included) needs its own folder."""
    from vlmtrain.config.load import ConfigError, config_changes

    path = cfg.out / DEMO_CONFIG_NAME
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err}); delete {cfg.out} or pass another --out") from None
    changes = config_changes(saved, demo_settings(cfg))
    if changes:
        raise ConfigError(
            f"{cfg.out} holds a demo built with other settings ({'; '.join(changes)}); pass another --out, "
            f"or delete {cfg.out} to rebuild it with these"
        )


def apply_tweaks(cfg: DemoConfig, tweaks: list[str]) -> DemoConfig:
    """`cfg` with `FIELD=VALUE` overrides of DemoConfig fields (the single-change experiments of docs/demo.md).

    Values parse by the field's default: bools (true/false), ints, floats, comma-separated int tuples, strings.
    """
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(DemoConfig) if f.name != "out"}
    changes: dict[str, Any] = {}
    for tweak in tweaks:
        name, sep, raw = tweak.partition("=")
        if not sep or name not in fields:
            raise ValueError(
                f"--tweak {tweak!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}"
            )
        default = getattr(cfg, name)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                value: Any = raw.lower() == "true"
            elif isinstance(default, tuple):
                value = tuple(int(v) for v in raw.split(","))
            else:
                value = type(default)(raw)
        except ValueError as err:
            raise ValueError(f"--tweak {tweak!r}: {err}") from None
        changes[name] = value
    return dataclasses.replace(cfg, **changes)


def warmstart_chats(records: dict[str, list[dict]]) -> list[list[dict[str, str]]]:
    """Each record of `records` (LLaVA-format records by kind of LM_READS_RECAP) as chat messages without the
    image placeholder: what the tokenizer is trained on and the LM warm start reads."""
    from vlmtrain.data.prompt import messages_from_turns

    return [
        [
            {**m, "content": m["content"].replace("<image>\n", "")}
            for m in messages_from_turns(rec["conversations"])
        ]
        for recs in records.values()
        for rec in recs
    ]


def lm_warmstart_texts(records: dict[str, list[dict]], tokenizer, reads_recap: str) -> list[str]:
    """The LM warm start's texts: each record of `records` (the "recaps" ones give each image's recap) in the
    chat template, without the image placeholder. A record of a kind named in `reads_recap` that has an image
    follows that image's recap, where the stages put the image features; `none` names no kind."""
    chats = [tokenizer.apply_chat_template(m, tokenize=False) for m in warmstart_chats(records)]
    if reads_recap == "none":
        return chats
    recap = {rec["image"]: rec["conversations"][1]["value"] for rec in records["recaps"]}
    read = reads_recap.split(",")
    images = [rec.get("image") if kind in read else None for kind, recs in records.items() for rec in recs]
    return [f"{recap[i]}\n{chat}" if i else chat for i, chat in zip(images, chats, strict=True)]


WIDE_ROWS = 512
"""The stages' max_length before tight_rows (DemoConfig.tight_rows=False)."""

ROW_MULTIPLE = 32
"""The demo's max_length is its longest sample rounded up to this."""


def sample_length_bound(chats: list[list[dict[str, str]]], tokenizer, image_tokens: int) -> int:
    """The stages' max_length: the longest of `chats` in tokens plus the image tokens, rounded up to
    ROW_MULTIPLE, so no sample is shortened and the packed rows of stage 3's token budget stay as narrow as
    the longest sample. On a CPU the attention of a packed row is dense (its cost grows with the row width
    squared), so narrow rows make a stage-3 step faster (docs/demo.md, `tight_rows`)."""
    texts = tokenizer.apply_chat_template(chats, tokenize=False)
    longest = max(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return -(-(image_tokens + longest) // ROW_MULTIPLE) * ROW_MULTIPLE


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _expand_counts(counts: dict[str, dict[str, int]]) -> tuple[dict[str, str], dict[str, str]]:
    """{group: {answer: n}} as one id per training answer: (id -> answer, id -> group), vqa_metrics' inputs."""
    answers = {f"{g}:{a}:{i}": a for g, c in counts.items() for a, n in c.items() for i in range(n)}
    return answers, {k: k.split(":")[0] for k in answers}


@dataclass
class Variant:
    name: str
    mask: str
    captions: str  # "recap" or "short"
    align: bool = True
    """False: no stages 0-1; stage 2 starts from the warm start and also gets their steps (--compare-stages)."""

    def stages(self, cfg: DemoConfig) -> tuple[int, ...]:
        return tuple(s for s in cfg.stages_only if self.align or s >= 2)


def _stage_configs(
    cfg: DemoConfig, variant: Variant, init: Path, shards: Path, dest: Path, max_length: int
) -> list[StageConfig]:
    """The shipped presets with the demo's model, data (`max_length`: sample_length_bound), batch, steps and LR
    scale written in."""
    out = []
    dest.mkdir(parents=True, exist_ok=True)
    for stage in variant.stages(cfg):
        data = read_json(shipped_stage_path(stage))
        data["model"] = {
            "vision": str(init / "vision"),
            "language": str(init / "language"),
            "tokenizer": str(init / "tokenizer"),
            "attn_backend": "sdpa",
        }
        for group in data["modules"].values():
            group["lr"] *= cfg.lr_scale[stage]
        source = "instruct" if stage == 3 else variant.captions
        data["data"].update(
            train=str(shards / source / "manifest.json"), max_length=max_length, num_workers=1
        )
        data["batch"] = {"global_batch_size": cfg.global_batch, "micro_batch_size": cfg.micro_batch}
        steps = cfg.stage_steps[stage]
        if stage == 2 and not variant.align:  # the same total steps: stage 2 gets those of stages 0-1
            steps += cfg.stage_steps[0] + cfg.stage_steps[1]
            data["init_from"] = None  # built from the warm-started components in `model`
        data["train"].update(
            max_steps=steps,
            save_every=max(10, steps // 2),
            seed=cfg.seed,
            gradient_checkpointing=False,
            # fp32 compute: most CPUs lack native bf16 and emulate it ~20x slower (vlmtrain.precision).
            precision="fp32",
        )
        data["optim"]["warmup_ratio"] = 0.05
        if variant.mask == "causal":
            data["mask"] = {"mode": "causal", "noise_ratio": 0.0, "noise_strategy": "random_token"}
        path = dest / f"stage{stage}.json"
        path.write_text(json.dumps(data, indent=2))
        out.append(stage_config_from_dict(data, source=str(path)))
    return out


class Demo:
    def __init__(self, cfg: DemoConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or make_console()
        self.out = cfg.out
        self.timings: dict[str, float] = {}
        self.variants: list[Variant] = []

    def _timed(self, name: str, fn, *args, **kwargs):
        self.console.rule(f"[bold cyan]{name}")
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t, 1)
        return result

    # ---- data -------------------------------------------------------------------------------------------
    def make_data(self):
        from vlmtrain.data.shard import shard
        from vlmtrain.demo.corpus import write_corpus

        c = self.cfg
        corpus = write_corpus(
            self.out / "data",
            c.n_train,
            c.n_test,
            image_size=VISION["image_size"],
            seed=c.seed,
            train_turns=c.train_turns,
            conversations=c.conversations,
            caption_turn=c.caption_turn,
            overwrite=True,
        )
        shards = self.out / "shards"
        jobs = {
            "recap": (corpus.recap_train, "llava", {}),
            "short": (corpus.short_train, "llava", {}),
            "instruct": (corpus.instruct_train, "llava", {}),
            "karpathy_test": (corpus.karpathy, "karpathy", {"split": "test"}),
            **{
                name: (src, "jsonl", {"question_column": "question", "answer_column": "answer"})
                for name, src in (("vqa_test", corpus.vqa_test), ("vqa_train", corpus.vqa_train))
            },
        }
        for name, (src, fmt, kw) in jobs.items():
            summary = shard(src, fmt, corpus.images, shards / name, shard_size=500, progress=False, **kw)
            skipped = sum(summary.skipped.values())
            self.console.print(
                f"  {name:14s} {summary.samples:5d} samples, {len(summary.shards)} shards, {skipped} skipped"
            )
        return corpus, shards

    def make_components(self, corpus) -> tuple[Path, int]:
        """The tokenizer and warm-started towers under DIR/init, and the stages' max_length."""
        from vlmtrain.data.tokenizer import build_tokenizer
        from vlmtrain.demo.corpus import is_first_conversation
        from vlmtrain.demo.warmstart import pretrain_language, pretrain_vision

        c = self.cfg
        init = self.out / "init"
        everything = {
            kind: json.loads(path.read_text())
            for kind, path in zip(
                LM_READS_RECAP, (corpus.recap_train, corpus.short_train, corpus.instruct_train), strict=True
            )
        }
        # The warm starts read one conversation per image whatever `conversations` is: it changes stage 3 only.
        records = {
            kind: [r for r in recs if is_first_conversation(r["id"])] for kind, recs in everything.items()
        }
        # Trained on the texts as the model reads them, template included, as Qwen's tokenizer covers them.
        chats = warmstart_chats(records)
        tokenizer = (
            build_tokenizer((), vocab_size=c.vocab_size, chats=chats)
            if c.tokenizer_chats
            else build_tokenizer([" ".join(m["content"] for m in chat) for chat in chats], c.vocab_size)
        )
        tokenizer.save_pretrained(str(init / "tokenizer"))
        side = VISION["image_size"] // c.patch_size
        bound = sample_length_bound(warmstart_chats(everything), tokenizer, side * side)
        texts = lm_warmstart_texts(records, tokenizer, c.lm_reads_recap)
        lm = self._warm(
            "language model",
            c.lm_warmstart_steps,
            lambda cb: pretrain_language(
                texts,
                tokenizer,
                language_config(len(tokenizer), c.lm_width, c.lm_layers, c.lm_init_std),
                c.lm_warmstart_steps,
                seed=c.seed,
                on_step=cb,
            ),
        )
        lm.save_pretrained(str(init / "language"))
        short = [
            (corpus.images / rec["image"], rec["conversations"][1]["value"]) for rec in records["captions"]
        ]
        scenes = None
        if c.dense_warmstart:
            by_image = {
                row["image"]: row for row in map(json.loads, corpus.scenes_train.read_text().splitlines())
            }
            scenes = [by_image[rec["image"]] for rec in records["captions"]]
        tower = self._warm(
            "vision tower",
            c.vision_warmstart_steps,
            lambda cb: pretrain_vision(
                [p for p, _ in short],
                [s for _, s in short],
                tokenizer,
                {**VISION, "patch_size": c.patch_size},
                c.vision_warmstart_steps,
                seed=c.seed,
                on_step=cb,
                scenes=scenes,
                cell_position=c.cell_position,
            ),
        )
        tower.save_pretrained(str(init / "vision"))
        return init, (bound if c.tight_rows else max(bound, WIDE_ROWS))

    def _warm(self, what: str, steps: int, fn):
        from rich.progress import Progress

        with Progress(console=self.console) as progress:
            task = progress.add_task(f"warm-start {what}", total=steps)

            def cb(step: int, loss: float) -> None:
                progress.update(task, completed=step, description=f"warm-start {what} loss {loss:.3f}")

            return fn(cb)

    # ---- training and evaluation ------------------------------------------------------------------------
    def train_variant(self, variant: Variant, init: Path, max_length: int, shards: Path, ctx) -> Path:
        from vlmtrain.train.run import run_stages

        root = self.out / "variants" / variant.name
        stages = _stage_configs(self.cfg, variant, init, shards, root / "configs", max_length)
        run_stages(stages, root / "runs", ctx, resume=True)
        return root

    def evaluate(self, root: Path, shards: Path, eval_dir: Path) -> dict[str, dict[str, float]]:
        from vlmtrain.eval.generate import GenerationConfig
        from vlmtrain.eval.run import eval_caption, eval_vqa

        final = root / "runs" / f"stage{self.cfg.stages_only[-1]}" / "final"
        cap = eval_caption(
            final,
            str(shards / "karpathy_test" / "manifest.json"),
            eval_dir,
            None,
            GenerationConfig(max_new_tokens=32),
            self.cfg.eval_batch,
            console=self.console,
        )
        vqa = {
            key: eval_vqa(
                final,
                str(shards / split / "manifest.json"),
                eval_dir / key,
                GenerationConfig(max_new_tokens=6),
                self.cfg.eval_batch,
                console=self.console,
            )
            for key, split in (("vqa", "vqa_test"), ("vqa_train", "vqa_train"))
        }
        return {"caption": cap, **vqa}

    def baselines(self, corpus, eval_dir: Path) -> dict[str, Any]:
        from vlmtrain.eval.caption_metrics import best_constant_caption
        from vlmtrain.eval.vqa_metrics import majority_answer_baseline

        refs: dict[Any, list[str]] = {}
        for ann in json.loads((eval_dir / "references.json").read_text())["annotations"]:
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        caption, cap_metrics = best_constant_caption(refs)
        train, train_types = _expand_counts(
            json.loads(corpus.vqa_train_answers.read_text())["by_answer_type"]
        )
        gold = [json.loads(line) for line in corpus.vqa_test.read_text().splitlines()]
        chosen, vqa_metrics = majority_answer_baseline(
            train,
            train_types,
            {g["id"]: g["answer"] for g in gold},
            {g["id"]: g["answer_type"] for g in gold},
        )
        return {
            "constant_caption": caption,
            "caption": cap_metrics,
            "majority_answers": chosen,
            "vqa": vqa_metrics,
        }

    # ---- reporting ---------------------------------------------------------------------------------------
    def report(
        self, results: dict[str, dict], base: dict[str, Any], main: str, per_type: dict[str, dict[str, float]]
    ) -> None:
        from vlmtrain.eval.report import metrics_table, vqa_table

        rows = [(f"model ({name})", r["caption"]) for name, r in results.items()]
        rows.append((f"best constant caption: {base['constant_caption']!r}", base["caption"]))
        self.console.print(metrics_table(rows, "Captioning, synthetic Karpathy-style test split (x100)"))
        vrows = [(f"model ({name})", r["vqa"]) for name, r in results.items()]
        vrows.append((f"majority answer {base['majority_answers']}", base["vqa"]))
        self.console.print(vqa_table(vrows, "VQA on the test split (x100)"))
        self.report_types(per_type, main)
        self._examples(main)

    def by_question_type(self, corpus, eval_dir: Path) -> dict[str, dict[str, float]]:
        """Accuracy per question type of the model in `eval_dir` and of the majority training answer of each
        question type (a stronger baseline than one answer per answer type: e.g. the most common color), and
        the model's accuracy on questions of its own training images (`train`: fit against generalisation)."""
        from vlmtrain.data.answers import normalize_answer
        from vlmtrain.eval.vqa_metrics import majority_answers

        majority = majority_answers(
            *_expand_counts(json.loads(corpus.vqa_train_answers.read_text())["by_question_type"])
        )

        def predicted(name: str) -> Callable[[dict], str]:
            preds = json.loads((eval_dir / name / "predictions.json").read_text())
            by_id = {p["question_id"]: p["answer"] for p in preds}
            return lambda g: by_id[g["id"]]

        def hits(gold_file: Path, answer: Callable[[dict], str]) -> dict[str, list[float]]:
            out: dict[str, list[float]] = {}
            for g in map(json.loads, gold_file.read_text().splitlines()):
                hit = normalize_answer(answer(g)) == normalize_answer(g["answer"])
                out.setdefault(g["question_type"], []).append(float(hit))
            return out

        model = hits(corpus.vqa_test, predicted("vqa"))
        base = hits(corpus.vqa_test, lambda g: majority.get(g["question_type"], ""))
        train = hits(corpus.vqa_train, predicted("vqa_train"))
        return {
            t: {
                "model": _mean(model[t]),
                "majority": _mean(base[t]),
                "majority_answer": majority.get(t, ""),
                "n": len(model[t]),
                "train": _mean(train.get(t, [])),
                "n_train": len(train.get(t, [])),
            }
            for t in sorted(model)
        }

    def report_types(self, per_type: dict[str, dict[str, float]], main: str) -> None:
        table = Table(title=f"VQA accuracy per question type ({main}, x100)")
        cols = (
            "question type",
            "questions",
            "model",
            "majority answer of the type",
            "majority",
            "model, train questions",
        )
        for col in cols:
            table.add_column(
                col, justify="left" if col.startswith(("question type", "majority answer")) else "right"
            )
        for t, r in per_type.items():
            table.add_row(
                t,
                str(r["n"]),
                f"{100 * r['model']:.1f}",
                repr(r["majority_answer"]),
                f"{100 * r['majority']:.1f}",
                f"{100 * r['train']:.1f} ({r['n_train']})",
            )
        self.console.print(table)

    def _examples(self, main: str) -> None:
        # A seeded random draw, not the first rows: the first test images are no better or worse than others,
        # but a fixed head of the file would always show the same few.
        rng = random.Random(self.cfg.seed)
        preds = json.loads((self.out / "eval" / "predictions.json").read_text())
        refs = json.loads((self.out / "eval" / "references.json").read_text())["annotations"]
        by_image: dict[Any, list[str]] = {}
        for a in refs:
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        table = Table(title=f"Example captions ({main})")
        table.add_column("image")
        table.add_column("model")
        table.add_column("a reference")
        for p in rng.sample(preds, min(self.cfg.examples, len(preds))):
            table.add_row(str(p["image_id"]), p["caption"], by_image[p["image_id"]][0])
        self.console.print(table)
        qa = json.loads((self.out / "eval" / "vqa" / "predictions.json").read_text())
        table = Table(title=f"Example answers ({main})")
        for col in ("question", "model", "truth"):
            table.add_column(col)
        for r in rng.sample(qa, min(2 * self.cfg.examples, len(qa))):
            table.add_row(r["question"], r["answer"], r["gold"])
        self.console.print(table)

    def curves(self, variant: str) -> dict[int, list[tuple[int, float]]]:
        from vlmtrain.logging import loss_curve

        runs = self.out / "variants" / variant / "runs"
        stages = next(v for v in self.variants if v.name == variant).stages(self.cfg)
        return {stage: loss_curve(runs / f"stage{stage}" / "metrics.jsonl") for stage in stages}

    def plot(self, variant: str) -> Path:
        from vlmtrain.logging import plot_loss_curves

        curves = {f"stage {stage}": points for stage, points in self.curves(variant).items()}
        return plot_loss_curves(curves, self.out / "loss_curves.png", f"Training loss per stage ({variant})")

    def compare(self, comparison: Comparison, results: dict[str, dict]) -> dict[str, Any]:
        curves = {v: self.curves(v) for v in comparison.variants}
        rows = comparison_rows(comparison, results, curves)
        self.console.print(comparison_table(comparison, rows))
        plot = plot_comparison(comparison, curves, self.out / f"compare_{comparison.name}.png")
        self.console.print(f"  plot: {plot}")
        return as_json(comparison, rows, plot)

    # ---- the whole run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import shutil

        from vlmtrain.dist import init_distributed
        from vlmtrain.durable import write_text_durably

        c = self.cfg
        t0 = time.perf_counter()
        check_same_settings(c)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_durably(self.out / DEMO_CONFIG_NAME, json.dumps(demo_settings(c), indent=2))
        corpus, shards = self._timed("1/5 synthetic corpus and shards", self.make_data)
        init, max_length = self._timed(
            "2/5 tokenizer and warm-started tiny SigLIP / Qwen2", self.make_components, corpus
        )
        ctx = init_distributed()
        variants = [Variant(c.mask, c.mask, "recap")]
        comparisons = []
        if c.compare_masks:
            other = "causal" if c.mask == "prefix" else "prefix"
            variants.append(Variant(other, other, "recap"))
            comparisons.append(
                Comparison(
                    "masks",
                    "Prefix-LM vs causal mask (the paper's finding 1)",
                    ("prefix", "causal"),
                    "Same components, data, order and steps in every stage; only the mask differs "
                    "(and stage 0's noise, which needs the bidirectional mask).",
                )
            )
        if c.compare_captions:
            short = f"{c.mask}-short-captions"
            variants.append(Variant(short, c.mask, "short"))
            comparisons.append(
                Comparison(
                    "captions",
                    "Recaps vs short human-style captions in stages 0-2 (the paper's finding 2)",
                    (c.mask, short),
                    "Stages 0-2 train on different texts for the same images (their losses compare like "
                    "the paper's Fig. 5); stage 3 trains both on the same conversations.",
                )
            )
        if c.compare_stages:
            direct = f"{c.mask}-without-stages-0-1"
            variants.append(Variant(direct, c.mask, "recap", align=False))
            comparisons.append(
                Comparison(
                    "stages",
                    "With vs without the alignment stages 0-1 (the paper's finding 3)",
                    (c.mask, direct),
                    "Same components, data and total steps: without stages 0-1, stage 2 starts from the warm "
                    "start (random projector) and runs their steps too; stage 3 is the same.",
                )
            )
        self.variants = variants
        results = {}
        for v in variants:
            root = self._timed(
                f"3/5 stages 0-3 ({v.name})", self.train_variant, v, init, max_length, shards, ctx
            )
            results[v.name] = self._timed(
                f"4/5 evaluation ({v.name})", self.evaluate, root, shards, root / "eval"
            )
        main = variants[0].name
        if (self.out / "eval").exists():
            shutil.rmtree(self.out / "eval")
        shutil.copytree(self.out / "variants" / main / "eval", self.out / "eval")
        base = self._timed("5/5 baselines", self.baselines, corpus, self.out / "eval")
        for v in variants:
            results[v.name]["vqa_by_type"] = self.by_question_type(
                corpus, self.out / "variants" / v.name / "eval"
            )
        self.report(results, base, main, results[main]["vqa_by_type"])
        plot = self.plot(main)
        compared = {comp.name: self.compare(comp, results) for comp in comparisons}
        total = round(time.perf_counter() - t0, 1)
        summary = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()},
            "results": results,
            "baselines": base,
            "timings_s": {**self.timings, "total": total},
            "loss_curves": str(plot),
            "comparisons": compared,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self.console.print(
            f"[bold green]demo finished in {total:.0f} s[/]; results in {self.out} (summary.json, eval/, loss_curves.png)"
        )
        return summary


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    return Demo(cfg, console).run()
