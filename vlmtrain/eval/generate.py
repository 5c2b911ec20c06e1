"""Batched generation with a KV cache: the image + prompt block is prefilled under the model's stage mask
(prefix or causal), then decoding continues causally. Greedy, beam search and sampling.

`use_cache=False` recomputes the whole sequence at every step with the dense mask: the reference that cached
generation must equal token for token.

In a distributed job whose model runs collectives inside its forward (FSDP all-gathers a sharded block when it
runs), every rank must take the same number of decoding steps: `all_done` makes the stop decision a collective
one (see `vlmtrain.train.engines.base.Engine.generator`), and ranks whose rows have all stopped keep decoding
padding, whose results are discarded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import DynamicCache

from vlmtrain.data.prompt import ChatRenderer, Message, Prompt
from vlmtrain.models.masks import decode_mask, position_ids_from_sample_ids, prepare_mask
from vlmtrain.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; recorded next to evaluation results."""

    max_new_tokens: int = 64
    """Most tokens generated per prompt."""
    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    """Decoding strategy."""
    num_beams: int = 3
    """Beams for `beam`."""
    length_penalty: float = 1.0
    """Beam score = sum log p / length ** length_penalty."""
    temperature: float = 1.0
    """Softmax temperature for `sample`."""
    top_k: int = 0
    """Keep the k most likely tokens when sampling (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: all)."""
    seed: int = 0
    """Seed for `sample`."""
    mask_mode: Literal["prefix", "causal"] = "prefix"
    """Mask of the prefilled image + prompt block: the mode the model was trained with."""
    use_cache: bool = True
    """Reuse keys/values across steps (False recomputes everything: slow, for checking)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.strategy == "beam" and self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.strategy == "sample" and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


AllDone = Callable[[bool], bool]  # this rank's rows have all stopped -> every rank's rows have


class Generator:
    """Generates answers from a VisionLanguageModel (SDPA or eager backend).

    `all_done` (default: this process alone decides) is asked once per decoding step whether decoding may
    stop; a distributed caller passes a collective so that every rank runs the same number of steps, and
    then every rank must call `generate` equally often, each time with at least one prompt.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer: Any,
        config: GenerationConfig,
        all_done: AllDone | None = None,
    ) -> None:
        if model.attn_backend == "flex":
            raise ValueError(
                "generation needs the sdpa or eager backend; load the model with attn_backend='sdpa'"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.renderer = ChatRenderer(tokenizer)
        # From the chat template: the turn end first, then eos and pad (a Llama 3 tokenizer has no pad token).
        self.stops = frozenset(self.renderer.format.stop_ids)
        self.pad_id = self.renderer.format.pad_id
        self.device = next(model.parameters()).device
        self.lockstep = all_done is not None
        self.all_done: AllDone = all_done or (lambda done: done)

    def prompt(self, messages: list[Message], has_image: bool) -> Prompt:
        """The prompt for the answer to the last (user) message, laid out as in training."""
        return self.renderer.build_prompt(messages, has_image, self.model.num_image_tokens)

    # ---- layout ---------------------------------------------------------------------------------------
    def _left_pad(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left padding makes every prompt end at the same column, so decoding appends one column."""
        length = max(len(p.input_ids) for p in prompts)
        b = len(prompts)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        sample_ids = torch.zeros(b, length, dtype=torch.long)
        flags = torch.zeros(b, length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            n = len(p.input_ids)
            ids[i, length - n :] = torch.tensor(p.input_ids)
            sample_ids[i, length - n :] = 1
            if p.has_image:
                flags[i, length - n : length - n + self.model.num_image_tokens] = True
        return ids.to(self.device), sample_ids.to(self.device), flags.to(self.device)

    def _mask(self, sample_ids: torch.Tensor, flags: torch.Tensor, dtype: torch.dtype):
        return prepare_mask(
            self.model.attn_backend, self.config.mask_mode, sample_ids, flags, dtype, self.model.attn_windows
        )

    def _step_mask(self, key_valid: torch.Tensor, dtype: torch.dtype):
        """Mask of one new token per row: it sees every real key of its row (itself included), within the
        window on sliding layers."""
        return decode_mask(key_valid, self.model.attn_backend, dtype, self.model.attn_windows)

    # ---- logits ---------------------------------------------------------------------------------------
    def _prefill(self, ids, sample_ids, flags, pixel_values, cache):
        embeds = self.model.embed(ids, flags, pixel_values)
        out = self.model.language.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=self._mask(sample_ids, flags, embeds.dtype),
            position_ids=position_ids_from_sample_ids(sample_ids),
            cache=cache,  # transformers 5.24 renamed past_key_values (removed in 5.40)
            use_cache=cache is not None,
        )
        return self.model.language.get_output_embeddings()(out.last_hidden_state[:, -1]).float()

    def _decode(self, tokens, key_valid, positions, cache):
        embeds = self.model.language.get_input_embeddings()(tokens[:, None])
        out = self.model.language.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=self._step_mask(key_valid, embeds.dtype),
            position_ids=positions[:, None],
            cache=cache,  # transformers 5.24 renamed past_key_values (removed in 5.40)
            use_cache=True,
        )
        return self.model.language.get_output_embeddings()(out.last_hidden_state[:, -1]).float()

    # ---- public ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], pixel_values: torch.Tensor | None) -> list[list[int]]:
        """Generated token ids per prompt (without the stop token). `pixel_values`: [n_images, 3, H, W] in
        the order of the prompts that have an image, uint8 (normalized by the model) or normalized floats."""
        if not prompts:
            if self.lockstep:
                raise ValueError(
                    "lockstep generation needs at least one prompt on every rank (pad with a dummy)"
                )
            return []
        n_img = sum(p.has_image for p in prompts)
        if (pixel_values is None and n_img) or (pixel_values is not None and pixel_values.shape[0] != n_img):
            got = 0 if pixel_values is None else pixel_values.shape[0]
            raise ValueError(f"{n_img} prompts have an image but {got} images were given")
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device)
        ids, sample_ids, flags = self._left_pad(prompts)
        if self.config.strategy == "beam":
            return self._beam(ids, sample_ids, flags, pixel_values)
        return self._sample_or_greedy(ids, sample_ids, flags, pixel_values)

    def _next_logits_uncached(self, ids, sample_ids, flags, pixel_values) -> torch.Tensor:
        return self._prefill(ids, sample_ids, flags, pixel_values, cache=None)

    def _choose(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.config.strategy == "greedy":
            return logits.argmax(-1)
        logits = logits / self.config.temperature
        if self.config.top_k > 0:
            kth = torch.topk(logits, min(self.config.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.config.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > self.config.top_p  # keep the token that crosses top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=gen).flatten().to(logits.device)

    def _sample_or_greedy(self, ids, sample_ids, flags, pixel_values) -> list[list[int]]:
        b = ids.shape[0]
        gen = torch.Generator().manual_seed(self.config.seed) if self.config.strategy == "sample" else None
        cache = DynamicCache() if self.config.use_cache else None
        key_valid = sample_ids > 0
        positions = position_ids_from_sample_ids(sample_ids)[:, -1]
        logits = self._prefill(ids, sample_ids, flags, pixel_values, cache)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b  # on the host: one device-to-host copy per step (`tolist`), not one per row
        for _ in range(self.config.max_new_tokens):
            tokens = self._choose(logits, gen)
            if any(done):  # rows that stopped are fed padding (their cache rows are never read again)
                tokens = tokens.masked_fill(torch.tensor(done, device=self.device), self.pad_id)
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    if t in self.stops:
                        done[i] = True
                    else:
                        out[i].append(t)
            if self.all_done(all(done)):
                break
            positions = positions + 1
            key_valid = torch.cat([key_valid, torch.ones(b, 1, dtype=torch.bool, device=self.device)], 1)
            if cache is not None:
                logits = self._decode(tokens, key_valid, positions, cache)
            else:
                ids = torch.cat([ids, tokens[:, None]], 1)
                sample_ids = torch.cat(
                    [sample_ids, torch.ones(b, 1, dtype=torch.long, device=self.device)], 1
                )
                flags = torch.cat([flags, torch.zeros(b, 1, dtype=torch.bool, device=self.device)], 1)
                logits = self._next_logits_uncached(ids, sample_ids, flags, pixel_values)
        return out

    def _beam(self, ids, sample_ids, flags, pixel_values) -> list[list[int]]:
        k = self.config.num_beams
        b = ids.shape[0]
        cache = DynamicCache() if self.config.use_cache else None
        logits = self._prefill(ids, sample_ids, flags, pixel_values, cache)
        # Expand every row into k beams; only beam 0 is live at first so the k beams start distinct.
        if cache is not None:
            cache.batch_repeat_interleave(k)
        ids = ids.repeat_interleave(k, 0)
        sample_ids = sample_ids.repeat_interleave(k, 0)
        flags = flags.repeat_interleave(k, 0)
        if pixel_values is not None:
            pixel_values = pixel_values.repeat_interleave(k, 0)  # images follow their prompts' rows
        logprobs = logits.log_softmax(-1).repeat_interleave(k, 0)  # [b*k, V]
        vocab = logprobs.shape[-1]
        scores = torch.zeros(b, k, device=self.device)
        scores[:, 1:] = float("-inf")
        tokens_so_far: list[list[int]] = [[] for _ in range(b * k)]
        finished = torch.zeros(b * k, dtype=torch.bool, device=self.device)
        key_valid = sample_ids > 0
        positions = position_ids_from_sample_ids(sample_ids)[:, -1]
        for _ in range(self.config.max_new_tokens):
            # A finished beam may only continue with pad at no cost, so it keeps its score.
            frozen = torch.full_like(logprobs, float("-inf"))
            frozen[:, self.pad_id] = 0.0
            logprobs = torch.where(finished[:, None], frozen, logprobs)
            cand = (scores.reshape(-1, 1) + logprobs).reshape(b, k * vocab)
            top_scores, top_idx = torch.topk(cand, k, dim=-1)  # ties resolve by index: deterministic
            beam_src = (top_idx // vocab) + torch.arange(b, device=self.device)[:, None] * k  # [b, k]
            tokens = (top_idx % vocab).reshape(-1)
            src = beam_src.reshape(-1)
            new_finished = finished[src] | torch.tensor(
                [int(t) in self.stops for t in tokens.tolist()], device=self.device
            )
            tokens_so_far = [
                tokens_so_far[s] + ([int(t)] if not finished[s] else [])
                for s, t in zip(src.tolist(), tokens.tolist(), strict=True)
            ]
            finished = new_finished
            scores = top_scores
            if self.all_done(bool(finished.all())):
                break
            if cache is not None:
                cache.reorder_cache(src)
            key_valid = torch.cat(
                [key_valid[src], torch.ones(b * k, 1, dtype=torch.bool, device=self.device)], 1
            )
            positions = positions[src] + 1
            if cache is not None:
                logits = self._decode(tokens, key_valid, positions, cache)
            else:
                ids = torch.cat([ids[src], tokens[:, None]], 1)
                sample_ids = torch.cat(
                    [sample_ids[src], torch.ones(b * k, 1, dtype=torch.long, device=self.device)], 1
                )
                flags = torch.cat(
                    [flags[src], torch.zeros(b * k, 1, dtype=torch.bool, device=self.device)], 1
                )
                logits = self._next_logits_uncached(ids, sample_ids, flags, pixel_values)
            logprobs = logits.log_softmax(-1)
        results = []
        for row in range(b):
            best, best_score = None, float("-inf")
            for j in range(k):
                seq = tokens_so_far[row * k + j]
                text = [t for t in seq if t not in self.stops]
                norm = float(scores[row, j]) / max(1, len(seq)) ** self.config.length_penalty
                if norm > best_score:
                    best, best_score = text, norm
            results.append(best or [])
        return results

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
