"""Sample processing: decode and preprocess images, render conversations, build masked labels."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlmtrain.data.image_transform import ImageTransform, to_rgb
from vlmtrain.data.prompt import ROLES, ChatRenderer, TurnPair, messages_from_turns
from vlmtrain.data.tokenizer import image_token_id

# Hugging Face's "ignore" label: cross-entropy skips these positions.
IGNORE_INDEX = -100

# Members a sample may have; everything else in a shard is ignored (never decoded, never unpickled).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS | {"json"}
# PIL may only try these decoders, whatever the bytes claim to be (no EPS/Ghostscript, no exotic plugins).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")

TASKS = ("caption", "chat", "vqa")

# Every reason a training sample can be skipped for; the stream counts them by these names. (Records skipped
# while sharding have their own reasons: vlmtrain.data.images.SKIP_REASONS.)
SAMPLE_SKIP_REASONS = (
    "missing_json",  # no <key>.json member
    "bad_json",  # not UTF-8 JSON, or fields of the wrong type / unknown task / no references for a caption
    "bad_conversation",  # turns are not (human, gpt) pairs starting with human
    "special_token_in_text",  # a turn contains a special-token string (e.g. the turn end, <|image_pad|>)
    "missing_image",  # the JSON names an image but the sample has no image member
    "multiple_images",  # more than one image member for one key
    "bad_image",  # the image does not decode (truncated, corrupt, unsupported mode)
    "dropped_too_long",  # even the first (question, answer) pair does not fit max_length
    "corrupt_shard",  # lost with a damaged shard (truncated, unreadable, or not what its manifest says)
)
# Samples kept but shortened; counted as well, so nothing is cut silently.
TRUNCATIONS = ("truncated_turns", "truncated_answer")


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def decode_image(data: bytes | memoryview, ext: str, *, draft_size: int | None = None) -> Image.Image:
    """Decode a JPEG/PNG/WebP member. Any other extension raises: nothing else is ever deserialized.

    ``draft_size``: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale while both sides stay at
    least this size (much faster for photos far above the model's input size; pixels then differ slightly
    from the full-resolution reference resize).
    """
    kind = ext.lower().lstrip(".")
    if kind not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"refusing to decode a member with extension {ext!r}: only {sorted(IMAGE_EXTENSIONS)} are images "
            "(pickles, tensors and other formats are never loaded)"
        )
    img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard: undecoded member bytes by extension."""

    key: str
    """The members' shared name stem (a 10-digit index string in vlmtrain shards)."""
    shard: str
    """Name of the shard it came from."""
    index: int
    """Position of the sample in the shard's natural (tar) order."""
    members: Mapping[str, bytes | memoryview]
    """Extension (lower case, no dot) -> raw bytes, only for extensions in SAMPLE_EXTENSIONS."""
    epoch: int = 0
    """Epoch being read; seeds the caption choice when caption_choice == "random"."""


@dataclass(frozen=True)
class ProcessedSample:
    """A tokenized, labelled sample ready for collation."""

    input_ids: torch.Tensor
    """[T] long: image placeholders (if any) then the rendered conversation."""
    labels: torch.Tensor
    """[T] long: the token id where supervised, IGNORE_INDEX elsewhere (unshifted; the model shifts)."""
    image_flags: torch.Tensor
    """[T] bool: True at image placeholder positions."""
    pixel_values: torch.Tensor | None
    """[3, H, W] uint8, resized and cropped (ImageTransform.pixels; the model normalizes it on the device), or
    None for a text-only sample."""
    key: str
    """The sample's key in its shard."""
    shard: str
    """Name of the shard it came from."""
    index: int
    """Position in the shard's natural order."""
    truncation: str | None = None
    """None, "truncated_turns" (trailing pairs dropped) or "truncated_answer" (first answer cut)."""
    dropped_pairs: int = 0
    """How many trailing (user, assistant) pairs were dropped to fit max_length."""

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass(frozen=True)
class Skip:
    """A sample that cannot be used, and why (``reason`` is one of SAMPLE_SKIP_REASONS)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ProcessorConfig:
    """How raw samples become token sequences."""

    max_length: int
    """Most tokens per sample, image placeholders included; text is shortened to fit, images never."""
    num_image_tokens: int = 256
    """Placeholder tokens per image: the vision encoder's patch count (256 for SigLIP at 224 px / 14)."""
    caption_choice: Literal["first", "random"] = "first"
    """Caption tasks: answer with references[0], or a reference drawn from (seed, epoch, key)."""
    seed: int = 0
    """Seed for caption_choice == "random"."""
    min_answer_tokens: int = 4
    """When even the first pair is too long, keep it only if this many answer tokens still fit."""
    turn_end_token: str | None = None
    """Token closing each turn, supervised at the end of assistant turns so the model learns to stop; None:
    the one the chat template writes after an answer (vlmtrain.data.chat_format)."""
    jpeg_draft: bool = False
    """Decode JPEGs of at least twice the input size at 1/2..1/8 scale (libjpeg DCT scaling) before the
    resize: ~2.3x faster decode+preprocess for 640x480 photos, at a mean pixel difference of ~0.01 (on the
    [-1, 1] scale) from SigLIP's reference preprocessing."""

    def __post_init__(self) -> None:
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")
        if self.max_length <= self.num_image_tokens:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for text after {self.num_image_tokens} image "
                "tokens; raise max_length"
            )
        if self.caption_choice not in ("first", "random"):
            raise ValueError(f"caption_choice must be 'first' or 'random', got {self.caption_choice!r}")
        if self.min_answer_tokens < 1:
            raise ValueError(f"min_answer_tokens must be >= 1, got {self.min_answer_tokens}")


@dataclass(frozen=True)
class Fitted:
    """Token ids and labels of the text part after the max-length policy."""

    input_ids: list[int]
    """Text token ids (no image placeholders)."""
    labels: list[int]
    """Labels aligned with input_ids."""
    truncation: str | None
    """None, "truncated_turns" or "truncated_answer"."""
    dropped_pairs: int
    """Trailing pairs left out (including the ones after a truncated first answer)."""


def fit_pairs(pairs: Sequence[TurnPair], budget: int, min_answer_tokens: int) -> Fitted | None:
    """Apply the max-length policy to the text tokens; None when the sample must be dropped.

    Keep as many leading pairs as fit in ``budget``; if none fits, keep the first pair with its answer cut
    to the budget when at least ``min_answer_tokens`` answer tokens remain.
    """
    kept, used = 0, 0
    for pair in pairs:
        if used + len(pair) > budget:
            break
        kept, used = kept + 1, used + len(pair)
    if kept > 0:
        ids, labels = _concat(pairs[:kept])
        truncation = "truncated_turns" if kept < len(pairs) else None
        return Fitted(ids, labels, truncation, len(pairs) - kept)
    first = pairs[0]
    room = budget - len(first.prompt)
    if room < min_answer_tokens:
        return None
    cut = TurnPair(first.prompt, first.answer[:room], min(first.supervised, room))
    ids, labels = _concat([cut])
    return Fitted(ids, labels, "truncated_answer", len(pairs) - 1)


def _concat(pairs: Sequence[TurnPair]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for pair in pairs:
        ids += pair.prompt
        labels += [IGNORE_INDEX] * len(pair.prompt)
        ids += pair.answer
        labels += pair.answer[: pair.supervised]
        labels += [IGNORE_INDEX] * (len(pair.answer) - pair.supervised)
    return ids, labels


def caption_index(num_references: int, seed: int, epoch: int, key: str) -> int:
    """Deterministic reference choice from (seed, epoch, key), independent of worker and process."""
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_references


class SampleProcessor:
    """Turn a RawSample into a ProcessedSample (or a counted Skip) for one tokenizer and config.

    The conversation's token spans come from `vlmtrain.data.prompt.ChatRenderer`, the renderer generation
    and the export use too, so a prompt at inference is token for token the prompt part of training.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        config: ProcessorConfig,
        transform: ImageTransform | None = None,
    ) -> None:
        self.renderer = ChatRenderer(tokenizer, config.turn_end_token)
        self.tokenizer = tokenizer
        self.config = config
        self.transform = transform if transform is not None else ImageTransform()
        # May add <|image_pad|> to a tokenizer that lacks it; the model must then resize its embeddings.
        self.image_token_id = image_token_id(tokenizer)
        # The image prefix is the same for every sample; built once, concatenated per sample.
        self._image_ids = torch.full((config.num_image_tokens,), self.image_token_id, dtype=torch.long)
        self._image_labels = torch.full((config.num_image_tokens,), IGNORE_INDEX, dtype=torch.long)
        specials = set(tokenizer.all_special_tokens) | {self.renderer.turn_end_token}
        self._special_strings = tuple(sorted(specials))

    def __call__(self, raw: RawSample) -> ProcessedSample | Skip:
        record = _parse_json(raw)
        if isinstance(record, Skip):
            return record
        messages = self._messages(record, raw)
        if isinstance(messages, Skip):
            return messages
        image_ext = _image_member(raw, record)
        if isinstance(image_ext, Skip):
            return image_ext
        n_image = self.config.num_image_tokens if image_ext is not None else 0
        fitted = fit_pairs(
            self.renderer.tokenize_pairs(messages),
            self.config.max_length - n_image,
            self.config.min_answer_tokens,
        )
        if fitted is None:
            return Skip("dropped_too_long", f"first pair does not fit max_length={self.config.max_length}")
        pixel_values = None
        if image_ext is not None:
            pixel_values = self._pixels(raw.members[image_ext], image_ext)
            if isinstance(pixel_values, Skip):
                return pixel_values
        input_ids = torch.tensor(fitted.input_ids, dtype=torch.long)
        labels = torch.tensor(fitted.labels, dtype=torch.long)
        image_flags = torch.zeros(input_ids.numel() + n_image, dtype=torch.bool)
        if n_image:
            image_flags[:n_image] = True
            input_ids = torch.cat([self._image_ids, input_ids])
            labels = torch.cat([self._image_labels, labels])
        return ProcessedSample(
            input_ids=input_ids,
            labels=labels,
            image_flags=image_flags,
            pixel_values=pixel_values,
            key=raw.key,
            shard=raw.shard,
            index=raw.index,
            truncation=fitted.truncation,
            dropped_pairs=fitted.dropped_pairs,
        )

    def _messages(self, record: dict[str, Any], raw: RawSample) -> list[dict[str, str]] | Skip:
        turns = record["conversations"]
        if len(turns) < 2 or len(turns) % 2:
            return Skip("bad_conversation", f"{len(turns)} turns; need complete (human, gpt) pairs")
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if turn["from"] != expected:
                return Skip("bad_conversation", f"turn {i} is from {turn['from']!r}, expected {expected!r}")
        messages = messages_from_turns(turns)
        if record["task"] == "caption":
            messages[1] = {"role": "assistant", "content": self._caption(record["references"], raw)}
        for message in messages:
            for special in self._special_strings:
                if special in message["content"]:
                    return Skip("special_token_in_text", f"{message['role']} turn contains {special!r}")
        return messages

    def _caption(self, references: list[str], raw: RawSample) -> str:
        if self.config.caption_choice == "first":
            return references[0]
        return references[caption_index(len(references), self.config.seed, raw.epoch, raw.key)]

    def tokenize_pairs(self, messages: list[dict[str, str]]) -> list[TurnPair]:
        """Split the rendered conversation at answer starts and turn ends; tokenize each span."""
        return self.renderer.tokenize_pairs(messages)

    def _pixels(self, data: bytes | memoryview, ext: str) -> torch.Tensor | Skip:
        draft = self.transform.decode_size if self.config.jpeg_draft else None
        try:
            img = decode_image(data, ext, draft_size=draft)
            rgb = to_rgb(img)
        # Decoders raise many exception types on hostile or truncated bytes; any of them is a bad image.
        except Exception as err:
            return Skip("bad_image", f"{type(err).__name__}: {err}")
        return self.transform.pixels(rgb)  # uint8: the model normalizes on the device


def _parse_json(raw: RawSample) -> dict[str, Any] | Skip:
    data = raw.members.get("json")
    if data is None:
        return Skip("missing_json", f"members: {sorted(raw.members)}")
    try:
        record = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return Skip("bad_json", str(err))
    problem = _schema_problem(record)
    if problem is not None:
        return Skip("bad_json", problem)
    return record


def _schema_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"top level is {type(record).__name__}, expected an object"
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return "'conversations' must be a list"
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in ROLES
            or not isinstance(turn.get("value"), str)
        ):
            return f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}"
    task = record.get("task")
    if task not in TASKS:
        return f"task {task!r} is not one of {TASKS}"
    if task == "caption":
        refs = record.get("references")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            return "caption samples need 'references': a non-empty list of strings"
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        return f"'image' must be a string or null, got {type(image).__name__}"
    return None


def _image_member(raw: RawSample, record: dict[str, Any]) -> str | Skip | None:
    """Extension of the sample's image member, None for a text-only sample, or a Skip."""
    present = sorted(ext for ext in raw.members if ext in IMAGE_EXTENSIONS)
    if len(present) > 1:
        return Skip("multiple_images", f"image members {present}")
    if not present:
        if record.get("image") is not None:
            return Skip(
                "missing_image", f"JSON names image {record['image']!r} but no image member is stored"
            )
        return None
    return present[0]
