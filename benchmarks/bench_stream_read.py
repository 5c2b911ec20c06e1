"""Benchmark: samples/s of one reader process, vlmtrain's stream vs a plain WebDataset loop doing the same work.

Both sides read the same shards in the same process and do: JPEG decode, SigLIP preprocessing to 224 px
(RGB, bicubic resize, rescale, normalize), chat-template rendering, tokenization and label masking.
Two vlmtrain figures: its per-sample path (shard read, shuffled visit, processing: the same work as the
baseline) and the whole loader, which also pads samples into batches and keeps the resume accounting.

    python benchmarks/bench_stream_read.py [--samples 300] [--source-size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vlmtrain.data.process import ImageTransform, ProcessedSample, ProcessorConfig, RawSample, SampleProcessor
from vlmtrain.data.stream import build_loader, load_source, read_shard, sample_order
from vlmtrain.data.tokenizer import build_tokenizer, image_token_id

WORDS = (
    "a", "man", "woman", "child", "dog", "cat", "sits", "stands", "runs", "on", "in", "near",
    "the", "red", "blue", "green", "small", "large", "old", "young", "street", "park", "beach", "table",
    "bench", "field", "window", "car", "bus", "bike", "ball", "frisbee", "tree", "grass", "water", "snow",
)  # fmt: skip
PROMPT = "Describe the image briefly."
IMAGE_SIZE = 224
NUM_IMAGE_TOKENS = 256


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(8, 16)))).capitalize() + "."


def jpeg(rng: np.random.Generator, size: int) -> bytes:
    # smooth gradients plus noise: compresses like a photo rather than like pure noise
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack(
        [(x * rng.uniform(0.2, 1)) % 256, (y * rng.uniform(0.2, 1)) % 256, ((x + y) / 2) % 256], -1
    )
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, samples: int, per_shard: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    entries, texts = [], []
    for start in range(0, samples, per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        count = min(per_shard, samples - start)
        with tarfile.open(root / name, "w") as tar:
            for i in range(start, start + count):
                refs = [caption(rng) for _ in range(2)]
                texts += refs
                rec = {
                    "id": str(i), "source": "bench", "task": "caption", "references": refs, "image": f"{i}.jpg",
                    "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": refs[0]}],
                }  # fmt: skip
                for ext, data in (("json", json.dumps(rec).encode()), ("jpg", jpeg(rng, size))):
                    info = tarfile.TarInfo(f"{i:010d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append({"name": name, "samples": count})
    (root / "manifest.json").write_text(json.dumps({"samples": samples, "shards": entries}))
    return texts


def make_processor(tok: object) -> SampleProcessor:
    config = ProcessorConfig(max_length=NUM_IMAGE_TOKENS + 128, num_image_tokens=NUM_IMAGE_TOKENS)
    return SampleProcessor(tok, config, ImageTransform(image_size=IMAGE_SIZE))


def run_vlmtrain_samples(root: Path, tok: object) -> int:
    """The per-sample path of a stream worker: read shard, visit in order, process. No batching."""
    processor = make_processor(tok)
    count = 0
    for shard in load_source(root / "manifest.json"):
        contents = read_shard(shard.path)
        for i in sample_order(len(contents), 0, 0, shard.name, shuffle=True):
            out = processor(RawSample(contents.keys[i], shard.name, i, contents.members[i]))
            assert isinstance(out, ProcessedSample), out
            count += 1
    return count


def run_vlmtrain_loader(root: Path, tok: object) -> int:
    """The whole stream (num_workers=0): the above plus pad-collation into batches of 16 and accounting."""
    loader = build_loader(
        root / "manifest.json", make_processor(tok), micro_batch_size=16, rank=0, world_size=1, num_workers=0,
        seed=0, pad_token_id=tok.pad_token_id, shuffle=True, resample=False,
    )  # fmt: skip
    return sum(batch["num_samples"] for batch in loader)


def run_webdataset(root: Path, tok: object) -> int:
    urls = sorted(str(p) for p in root.glob("train-*.tar"))
    image_id = image_token_id(tok)
    mean = std = np.float32(0.5)
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        img = sample["jpg"].convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        pixel_values = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        rec = sample["json"]
        messages = [{"role": "user", "content": rec["conversations"][0]["value"]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": rec["references"][0]})
        full = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        input_ids = torch.tensor([image_id] * NUM_IMAGE_TOKENS + ids)
        labels = torch.tensor([-100] * (NUM_IMAGE_TOKENS + n_prompt) + ids[n_prompt:-1] + [-100])
        assert pixel_values.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and labels.shape == input_ids.shape
        count += 1
    return count


def rate(fn: Callable[[Path, object], int], root: Path, tok: object, repeats: int) -> tuple[float, int]:
    """Median samples/s over ``repeats`` runs (after one warm-up run that fills the page cache)."""
    n = fn(root, tok)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(root, tok)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--source-size", type=int, default=256, help="side of the generated JPEGs in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one reader process, as in a DataLoader worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = write_shards(root, args.samples, args.per_shard, args.source_size)
        tok = build_tokenizer([*texts, PROMPT], vocab_size=1000)
        base, n_base = rate(run_webdataset, root, tok, args.repeats)
        ours, n_ours = rate(run_vlmtrain_samples, root, tok, args.repeats)
        full, n_full = rate(run_vlmtrain_loader, root, tok, args.repeats)
    if not n_ours == n_full == n_base:
        sys.exit(f"the readers saw different sample counts ({n_ours}, {n_full}, {n_base})")
    print(
        f"{n_ours} samples of {args.source_size}x{args.source_size} JPEG -> {IMAGE_SIZE} px, 1 process, median of {args.repeats}"
    )
    print(f"webdataset .decode('pil') + PIL/numpy + tokenizer loop: {base:7.1f} samples/s")
    print(
        f"vlmtrain per-sample path (same work):                   {ours:7.1f} samples/s  ratio {ours / base:.2f}x"
    )
    print(
        f"vlmtrain loader (+ collate to batches of 16, accounting): {full:5.1f} samples/s  ratio {full / base:.2f}x"
    )


if __name__ == "__main__":
    main()
