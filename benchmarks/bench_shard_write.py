"""Images per second per core of `vlmtrain shard --image-size 224` against a plain webdataset + PIL loop.

Both sides do the same work on the same synthetic 640x480 JPEGs, in one process: read the file, decode,
convert to RGB, resize the shorter side to 224 (bicubic), encode JPEG quality 95 and write a tar shard
with a small JSON per sample. Each side runs ``--repeats`` times, alternating; the run with the least CPU
time counts. Images per CPU-second of the single process is the per-core rate (it does not move when other
processes compete for the cores, unlike wall-clock rates, which are printed too).

    python benchmarks/bench_shard_write.py [--images 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vlmtrain.data.shard import shard

SIZE = (640, 480)
IMAGE_SIZE = 224
SHARD_SIZE = 100


def make_images(folder: Path, count: int) -> Path:
    """``count`` photo-like 640x480 JPEGs (smooth gradients, edges and sensor-like noise) and a JSONL index."""
    rng = np.random.default_rng(0)
    width, height = SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    lines = []
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        pixels = np.stack(
            [127 + 90 * np.sin(x / (40 + 9 * c) + y / (55 + 7 * c) + phase[c]) for c in range(3)], axis=-1
        )
        pixels[(x.astype(int) // 80 + y.astype(int) // 60 + i) % 5 == 0] *= 0.5  # hard edges
        pixels += rng.normal(0, 8, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"{i:05d}.jpg", "caption": f"synthetic image {i}"}))
    index = folder / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    return index


def run_vlmtrain(index: Path, images: Path, out: Path) -> int:
    summary = shard(index, "jsonl", images, out, shard_size=SHARD_SIZE, image_size=IMAGE_SIZE, progress=False)
    return summary.samples


def run_baseline(index: Path, images: Path, out: Path) -> int:
    """The straightforward loop: PIL decode at full size, resize, encode, webdataset.ShardWriter."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with wds.ShardWriter(str(out / "base-%06d.tar"), maxcount=SHARD_SIZE, verbose=0) as sink:
        for i, line in enumerate(index.read_text().splitlines()):
            record = json.loads(line)
            with Image.open(images / record["image"]) as img:
                rgb = img.convert("RGB")
            width, height = rgb.size
            scale = IMAGE_SIZE / min(width, height)
            if scale < 1:
                rgb = rgb.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            rgb.save(buffer, format="JPEG", quality=95)
            sink.write(
                {"__key__": f"{i:010d}", "jpg": buffer.getvalue(), "json": json.dumps(record).encode()}
            )
            count += 1
    return count


def timed(
    fn: Callable[[Path, Path, Path], int], index: Path, images: Path, out: Path
) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, samples)."""
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    samples = fn(index, images, out)
    return time.perf_counter() - wall, time.process_time() - cpu, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = make_images(root, args.images)
        best: dict[str, tuple[float, float, int]] = {}
        for _ in range(args.repeats):
            for name, fn in (("baseline", run_baseline), ("vlmtrain", run_vlmtrain)):
                result = timed(fn, index, root, root / f"out-{name}")
                if name not in best or result[1] < best[name][1]:
                    best[name] = result
        assert best["vlmtrain"][2] == best["baseline"][2] == args.images, best
        print(f"{args.images} JPEGs {SIZE[0]}x{SIZE[1]} -> shorter side {IMAGE_SIZE}, JPEG q95, one process")
        for name, (wall, cpu, samples) in best.items():
            print(f"  {name:9s} {samples / wall:7.1f} img/s wall  {samples / cpu:7.1f} img/s per CPU-second")
        ratio = best["baseline"][1] / best["vlmtrain"][1]
        print(f"  ratio vlmtrain / baseline (per CPU-second): {ratio:.2f}x")


if __name__ == "__main__":
    main()
