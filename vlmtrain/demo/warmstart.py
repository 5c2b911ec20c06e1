"""Warm-start the demo's tiny components, standing in for the pretrained SigLIP and Qwen checkpoints.

The paper starts from a contrastively pretrained SigLIP and a pretrained Qwen2.5. Nothing can be downloaded
here, so the demo pretrains its tiny towers the same way, briefly, on the training split only:
- the language model: next-token prediction on the training texts (recaps, captions, conversations rendered
  with the chat template) without images, so it knows the language before stages 0-1 keep it frozen;
- the vision tower: SigLIP's sigmoid image-text contrastive loss against a bag-of-words text encoder of the
  short captions, plus a dense per-patch objective: each patch's feature predicts what its grid cell holds
  (colour, kind and size, or empty). A contrastive loss on pooled features alone blurs position (a linear
  probe read a patch's position from the warm-started tower 76% of the time, and the demo then answered
  "where" questions at chance, docs/demo.md); SigLIP so400m's patch features keep local content, and the
  dense term gives the tiny stand-in that property.
Both are saved with `save_pretrained` and loaded by stage 0 through the normal `from_pretrained` path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from vlmtrain.data.process import IGNORE_INDEX
from vlmtrain.demo.scenes import COLORS, GRID, KINDS, SIZES
from vlmtrain.models.backbones.vision import build_tower
from vlmtrain.models.language import load_language_model

Progress = Callable[[int, float], None]  # (step, loss)


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """10% warm-up then cosine decay to ~0. The warm-up lasts at least 2.5 steps: OneCycleLR divides by zero when
    its warm-up ends at step 0 (e.g. 10 steps x 10%). Under 3 steps there is no room for it: a constant `lr`."""
    if steps < 3:
        for group in opt.param_groups:
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=min(0.9, max(0.1, 2.5 / steps))
    )


def pretrain_language(
    texts: Sequence[str],
    tokenizer,
    config: dict,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Progress | None = None,
) -> PreTrainedModel:
    """A Qwen2 LM trained from scratch for `steps` steps of causal LM on `texts`."""
    torch.manual_seed(seed)
    model = load_language_model(None, config, "sdpa")
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = one_cycle(opt, lr, steps)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    model.train()
    for step in range(steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        length = max(map(len, batch))
        ids = torch.full((batch_size, length), pad)
        mask = torch.zeros(batch_size, length, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step:
            on_step(step + 1, float(loss.detach()))
    return model.eval()


class _BagOfWords(nn.Module):
    """The text side of the contrastive warm start: mean token embedding, then a linear map."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids: list[list[int]]) -> torch.Tensor:
        flat = torch.tensor([i for seq in ids for i in seq])
        offsets = torch.tensor([0] + [len(s) for s in ids[:-1]]).cumsum(0)
        return self.proj(self.embed(flat, offsets))


CELL_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("color", tuple(COLORS)),
    ("kind", KINDS),
    ("size", SIZES),
)
"""What a patch's feature predicts about its grid cell in the dense warm-start term (class 0: empty cell),
besides which of the GRID x GRID cells it lies in (the last target column)."""


def cell_targets(scene: dict, patches_per_side: int) -> torch.Tensor:
    """[patches, attributes + 1] class ids: for every patch (row-major), its grid cell's color, kind and size
    (1 + index; 0 when the cell is empty), then the cell's index (row x GRID + column).

    The cell index makes each patch feature say where it is: with rotary positions in the LM, an image
    token's place in the prefix only reaches attention scores (relative offsets), not the values read out,
    so "where is the red circle?" needs the position inside the feature. `scene` is a row of the corpus's
    scenes JSONL."""
    cells = torch.zeros(GRID, GRID, len(CELL_ATTRIBUTES) + 1, dtype=torch.long)
    cells[..., -1] = torch.arange(GRID * GRID).reshape(GRID, GRID)
    for obj in scene["objects"]:
        for a, (name, values) in enumerate(CELL_ATTRIBUTES):
            cells[obj["y"], obj["x"], a] = 1 + values.index(obj[name])
    rows = torch.arange(patches_per_side) * GRID // patches_per_side  # the cell each patch row lies in
    return cells[rows[:, None], rows[None, :]].reshape(patches_per_side**2, len(CELL_ATTRIBUTES) + 1)


def pretrain_vision(
    images: Sequence[Path],
    captions: Sequence[str],
    tokenizer,
    config: dict,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    on_step: Progress | None = None,
    scenes: Sequence[dict] | None = None,
    dense_weight: float = 1.0,
    cell_position: bool = True,
) -> PreTrainedModel:
    """A SigLIP vision tower trained with the sigmoid contrastive loss against caption bag-of-words, plus
    (given the images' `scenes`) `dense_weight` x the per-patch cross-entropy of what each patch's cell holds
    and, with `cell_position`, of which cell it is in."""
    torch.manual_seed(seed)
    spec, tower = build_tower({**config, "model_type": "siglip"})  # the SigLIP family, no pooling head
    cfg = spec.config
    dim = cfg.hidden_size
    text = _BagOfWords(len(tokenizer), dim)
    head = nn.Linear(dim, dim)
    # SigLIP's learnable temperature and bias, initialised as in the SigLIP paper (t' = log 10, b = -10).
    log_t = nn.Parameter(torch.tensor(2.302585))
    bias = nn.Parameter(torch.tensor(-10.0))
    side = cfg.image_size // cfg.patch_size
    classes = [1 + len(values) for _, values in CELL_ATTRIBUTES] + ([GRID * GRID] if cell_position else [])
    dense = nn.ModuleList(nn.Linear(dim, n) for n in classes)
    targets = None if scenes is None else torch.stack([cell_targets(sc, side) for sc in scenes])
    params = [*tower.parameters(), *text.parameters(), *head.parameters(), *dense.parameters(), log_t, bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = one_cycle(opt, lr, steps)
    transform = spec.transform
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    tokens = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    rng = random.Random(seed)
    tower.train()
    for step in range(steps):
        idx = rng.sample(range(len(pixels)), min(batch_size, len(pixels)))
        feats = tower(pixel_values=pixels[idx]).last_hidden_state  # [B, patches, D]
        img = F.normalize(head(feats.mean(1)), dim=-1)
        txt = F.normalize(text([tokens[i] for i in idx]), dim=-1)
        logits = img @ txt.T * log_t.exp() + bias
        # Pairs of the same caption text are positives too (identical scenes are common in a tiny world).
        same = torch.tensor([[captions[i] == captions[j] for j in idx] for i in idx], dtype=torch.float32)
        loss = -F.logsigmoid((2 * same - 1) * logits).sum() / len(idx)
        if targets is not None:
            cell = targets[idx]  # [B, patches, attributes]
            for a, classify in enumerate(dense):
                loss = loss + dense_weight * F.cross_entropy(
                    classify(feats).flatten(0, 1), cell[..., a].flatten()
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step:
            on_step(step + 1, float(loss.detach()))
    return tower.eval()
