"""Stage-0 input noise (Algorithm 1, ADD_NOISE_TO_INPUT): corrupt a fraction of the text input tokens.

Under a bidirectional mask a position can see the very token it must predict; replacing a fraction of
the text *inputs* (labels keep the clean tokens) removes that identity shortcut.

Strategy `random_token`: in each sample, exactly round(ratio * n) of its n text tokens (image tokens and
padding excluded) are chosen uniformly without replacement and replaced by a token drawn uniformly from
the ordinary (non-special) vocabulary. The draw depends only on the given torch.Generator, so a seed
reproduces it.
"""

from __future__ import annotations

import torch


def corrupt_text_tokens(
    input_ids: torch.Tensor,
    sample_ids: torch.Tensor,
    image_flags: torch.Tensor,
    ratio: float,
    replacement_ids: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy input_ids, bool mask of corrupted positions); `input_ids` itself is not modified.

    `replacement_ids` is the 1D set of token ids noise is drawn from (the non-special vocabulary).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"noise ratio must be in [0, 1], got {ratio}")
    if replacement_ids.numel() == 0:
        raise ValueError("replacement_ids is empty: no ordinary tokens to draw noise from")
    noisy = input_ids.clone()
    corrupted = torch.zeros_like(input_ids, dtype=torch.bool)
    if ratio == 0.0:
        return noisy, corrupted
    text = (sample_ids > 0) & ~image_flags.bool()
    # Per-sample exact counts need the positions of each sample; rows hold few samples, so loop on CPU.
    for b in range(input_ids.shape[0]):
        for sid in torch.unique(sample_ids[b]).tolist():
            if sid == 0:
                continue
            positions = torch.nonzero(text[b] & (sample_ids[b] == sid)).flatten()
            n_noise = round(ratio * positions.numel())
            if n_noise == 0:
                continue
            order = torch.randperm(positions.numel(), generator=generator)[:n_noise]
            chosen = positions[order.to(positions.device)]
            draws = torch.randint(replacement_ids.numel(), (n_noise,), generator=generator)
            noisy[b, chosen] = replacement_ids[draws].to(noisy.device, noisy.dtype)
            corrupted[b, chosen] = True
    return noisy, corrupted


def ordinary_token_ids(vocab_size: int, special_ids: list[int] | set[int]) -> torch.Tensor:
    """All ids below `vocab_size` that are not special tokens: the pool noise is drawn from."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    special = [i for i in special_ids if 0 <= i < vocab_size]
    keep[special] = False
    return torch.nonzero(keep).flatten()
