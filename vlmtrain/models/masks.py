"""Attention masks of the paper as pure functions of per-token sample ids and image flags.

Layout convention (see vlmtrain.data.collate): `sample_ids[b, t]` is 1..k for the sample a token belongs
to inside row b (several samples when rows are packed) and 0 for padding; `image_flags[b, t]` marks image
tokens. A mask entry `allowed[b, q, k]` is True when query token q may attend to key token k.

Modes:
- `bidirectional` (stage 0): every token of a sample sees every token of the same sample.
- `prefix` (stages 1-3): image tokens see all image tokens of their sample; text tokens are causal and
  see the whole image; image tokens never see text.
- `causal`: plain causal attention within a sample (the LLaVA baseline).

Tokens never attend across samples. A padding query attends only to itself, so no softmax row is empty
(an all-False row gives NaN in SDPA); its output is ignored by the loss.

Sliding-window layers (Gemma 3: five of every six layers; Qwen2/Mistral when configured) additionally only
see keys less than `window` positions away. An LM whose layers differ gets a mapping layer type -> mask
(`attention_windows`, `prepare_mask(..., windows=...)`), which transformers' decoders with `layer_types`
accept as their public `attention_mask` and hand to each layer by its type: every layer gets the stage's
mask, a sliding layer intersected with its window.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from vlmtrain.config.schema import MaskMode

MASK_MODES: tuple[str, ...] = ("bidirectional", "prefix", "causal")


def _check(mode: str, sample_ids: torch.Tensor, image_flags: torch.Tensor) -> None:
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
    if sample_ids.shape != image_flags.shape or sample_ids.dim() != 2:
        raise ValueError(
            f"sample_ids {tuple(sample_ids.shape)} and image_flags {tuple(image_flags.shape)} must both be [B, T]"
        )


def _allowed(
    mode: str,
    sid_q: torch.Tensor,
    sid_k: torch.Tensor,
    img_q: torch.Tensor,
    img_k: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    window: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask rule on broadcastable index tensors; shared by the dense and the FlexAttention builders.

    `window`: a sliding-window layer's width; keys at distance >= window (either side) are masked, except
    between two image tokens: as in transformers' Gemma 3 (sliding-window causal OR the image block), an image
    sees its whole self on every layer, so the stage rule "image sees all image" holds whatever the window.
    """
    same = (sid_q == sid_k) & (sid_q > 0)
    if mode == "bidirectional":
        rule = same
    elif mode == "causal":
        rule = same & (pos_k <= pos_q)
    else:
        # An image key is visible to every token of its sample (image tokens see the whole image, text sees
        # the whole image); a text key only to text queries at or after it, so image never sees text.
        rule = same & (img_k | (~img_q & (pos_k <= pos_q)))
    if window is not None:
        rule = rule & (((pos_q - pos_k).abs() < window) | (img_q & img_k))
    return rule | ((sid_q == 0) & (pos_q == pos_k))


def attention_allowed(
    mode: MaskMode, sample_ids: torch.Tensor, image_flags: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """Dense boolean mask [B, T, T]: True where query t may attend to key s."""
    _check(mode, sample_ids, image_flags)
    t = sample_ids.shape[1]
    pos = torch.arange(t, device=sample_ids.device)
    img = image_flags.bool()
    return _allowed(
        mode,
        sample_ids[:, :, None],
        sample_ids[:, None, :],
        img[:, :, None],
        img[:, None, :],
        pos[None, :, None],
        pos[None, None, :],
        window,
    )


def sdpa_mask(
    mode: MaskMode, sample_ids: torch.Tensor, image_flags: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """Boolean 4D mask [B, 1, T, T] for SDPA, handed to the LM as a prepared `attention_mask`."""
    return attention_allowed(mode, sample_ids, image_flags, window)[:, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive float mask: 0 where allowed, the dtype minimum elsewhere."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def eager_mask(
    mode: MaskMode,
    sample_ids: torch.Tensor,
    image_flags: torch.Tensor,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """Additive float 4D mask [B, 1, T, T] (0 where allowed, dtype minimum elsewhere) for eager attention."""
    return additive(sdpa_mask(mode, sample_ids, image_flags, window), dtype)


def flex_block_mask(
    mode: MaskMode, sample_ids: torch.Tensor, image_flags: torch.Tensor, window: int | None = None
):  # -> BlockMask
    """FlexAttention BlockMask with the same rule; blocks that are fully masked are skipped by the kernel.

    Built by a compiled `create_block_mask` (`_block_mask_builder`): it evaluates the rule tile by tile and
    never forms the dense [B, T, T] mask that the eager builder materialises (8 x 2,048^2 booleans per
    micro-batch at real size, on the device). Called once per micro-batch and shared by every layer (one per
    window for sliding layers). The window is a tensor input, so windowed and full layers share one compiled
    graph; the mode is a constant of the graph (one per stage).
    """
    _check(mode, sample_ids, image_flags)
    t = sample_ids.shape[1]
    # No window: a width no distance reaches, so `|q - k| < w` holds everywhere and the graph is shared.
    # torch.full fills on the device (no host-to-device copy that could wait on the stream).
    width = torch.full((), t + 1 if window is None else window, device=sample_ids.device)
    return _block_mask_builder()(sample_ids.contiguous(), image_flags.bool().contiguous(), width, mode)


def _build_block_mask(sids: torch.Tensor, imgs: torch.Tensor, window: torch.Tensor, mode: str):
    """`create_block_mask` of the stage rule on one batch; compiled by `_block_mask_builder`."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return _allowed(
            mode, sids[b, q_idx], sids[b, kv_idx], imgs[b, q_idx], imgs[b, kv_idx], q_idx, kv_idx, window
        )

    b, t = sids.shape
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=t, device=sids.device)


@functools.cache
def _block_mask_builder():
    """The compiled BlockMask builder (PyTorch's advice over `create_block_mask(_compile=True)`).

    `dynamic=True`: one graph for every row width and batch size, so steps of varying length do not
    recompile. Sizes of exactly 1 (a single-row micro-batch, a single-tile row of 128) are specialised by
    the compiler: each adds one graph the first time it occurs, never more.
    """
    return torch.compile(_build_block_mask, dynamic=True, fullgraph=True)


FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile; the flex path pads sequences to a multiple of it


def skipped_block_share(
    mode: MaskMode, sample_ids: torch.Tensor, image_flags: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE
) -> float:
    """Share of (query tile, key tile) pairs with no allowed pair: the tiles a block-sparse kernel skips.

    Rows are padded to a multiple of `block_size` with padding tokens first, as the flex path lays batches
    out. At real size (prefix mask, 256 image tokens + text, rows of 2,048) this is what FlexAttention saves
    over a dense kernel; SDPA with a boolean mask computes every tile.
    """
    _check(mode, sample_ids, image_flags)
    b, t = sample_ids.shape
    padded = -(-t // block_size) * block_size
    sids = torch.zeros(b, padded, dtype=sample_ids.dtype, device=sample_ids.device)
    imgs = torch.zeros(b, padded, dtype=torch.bool, device=sample_ids.device)
    sids[:, :t], imgs[:, :t] = sample_ids, image_flags.bool()
    n = padded // block_size
    tiles = attention_allowed(mode, sids, imgs).view(b, n, block_size, n, block_size).any(dim=4).any(dim=2)
    return 1.0 - float(tiles.float().mean())


Windows = Mapping[str, int | None]  # layer type -> sliding window (None: full attention)


def attention_windows(config: Any) -> Windows | None:
    """Per layer type, the window of an LM config whose layers differ; None when one mask serves every layer.

    Decoders with `config.layer_types` (Gemma 3, Qwen2/3, ...) take a mapping layer type -> mask. A config
    with a `sliding_window` but no layer types (Mistral) slides on every layer: one windowed mask, keyed "*".
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        sliding = {t for t in types if t != "full_attention"}
        if not sliding:
            return None
        if window is None:
            raise ValueError(f"{type(config).__name__} has {sorted(sliding)} layers but no sliding_window")
        return {t: (None if t == "full_attention" else int(window)) for t in sorted(set(types))}
    return {"*": int(window)} if window else None


def prepare_mask(
    backend: str,
    mode: MaskMode,
    sample_ids: torch.Tensor,
    image_flags: torch.Tensor,
    dtype: torch.dtype,
    windows: Windows | None = None,
):
    """The mask in the form the LM's attention backend takes through its public `attention_mask` argument.

    With `windows` (attention_windows of the LM config): a mapping layer type -> mask, each with its window
    (one mask per distinct window); for a single "*" entry, that one windowed mask.
    """
    if windows is None:
        return _backend_mask(backend, mode, sample_ids, image_flags, dtype, None)
    if backend == "flex":
        by_window = {w: flex_block_mask(mode, sample_ids, image_flags, w) for w in set(windows.values())}
    else:
        # The stage rule once; a window only removes far keys that are not both image tokens:
        # rule & (|q - k| < w | image pair) (padding keeps its diagonal).
        base = sdpa_mask(mode, sample_ids, image_flags)
        pairs = (image_flags[:, None, :, None] & image_flags[:, None, None, :]).bool()
        by_window = {}
        for w in set(windows.values()):
            near = _band(sample_ids.shape[1], w, sample_ids.device) if w is not None else None
            allowed = base if near is None else base & (near | pairs)
            by_window[w] = additive(allowed, dtype) if backend == "eager" else allowed
    if set(windows) == {"*"}:
        return by_window[windows["*"]]
    return {layer_type: by_window[w] for layer_type, w in windows.items()}


def _band(t: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T]: True where |q - k| < window."""
    pos = torch.arange(t, device=device)
    return (pos[:, None] - pos[None, :]).abs() < window


def _backend_mask(backend, mode, sample_ids, image_flags, dtype, window):
    if backend == "sdpa":
        return sdpa_mask(mode, sample_ids, image_flags, window)
    if backend == "eager":
        return eager_mask(mode, sample_ids, image_flags, dtype, window)
    if backend == "flex":
        return flex_block_mask(mode, sample_ids, image_flags, window)
    raise ValueError(f"unknown attention backend {backend!r}; expected sdpa, flex or eager")


def decode_mask(key_valid: torch.Tensor, backend: str, dtype: torch.dtype, windows: Windows | None = None):
    """Mask of one new token per row (cached decoding): it sees every real key of its row, itself included,
    and on a sliding layer only the keys within the window (the new token is the last column)."""
    keys = key_valid.shape[1]

    def one(window: int | None) -> torch.Tensor:
        allowed = key_valid
        if window is not None:
            near = torch.arange(keys, device=key_valid.device) > keys - 1 - window
            allowed = allowed & near
        allowed = allowed[:, None, None, :]
        return additive(allowed, dtype) if backend == "eager" else allowed

    if windows is None:
        return one(None)
    by_window = {w: one(w) for w in set(windows.values())}
    if set(windows) == {"*"}:
        return by_window[windows["*"]]
    return {layer_type: by_window[w] for layer_type, w in windows.items()}


def position_ids_from_sample_ids(sample_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 for each sample of a packed row; padding gets 0."""
    b, t = sample_ids.shape
    idx = torch.arange(t, device=sample_ids.device).expand(b, t)
    starts = torch.ones_like(sample_ids, dtype=torch.bool)
    starts[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    start_idx = torch.cummax(start_idx, dim=1).values
    return torch.where(sample_ids > 0, idx - start_idx, torch.zeros_like(idx))
