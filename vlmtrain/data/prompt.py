"""Sample -> prompt token ids: the one place a conversation becomes tokens.

Training (`vlmtrain.data.process.SampleProcessor`), validation and evaluation (`vlmtrain.eval.run`),
`vlmtrain caption` / `ask` and the exported chat template (`vlmtrain.export`) all take their layout from here:

    [image placeholder] * num_image_tokens   (only when the sample has an image)
    the tokenizer's chat template, split into (prompt, answer) spans per user turn, each span tokenized alone

`ChatRenderer.tokenize_pairs` gives training its (prompt, answer) token spans; `ChatRenderer.prompt_ids` gives
generation the ids of a conversation that ends with a user turn plus the assistant header: by construction
exactly the prompt part training saw before that answer. `multimodal_chat_template` wraps the tokenizer's text
template so that transformers' standard multimodal messages render this same layout.

Where answers start and end (the turn-end token, the template's turn suffix and answer prefix) comes from the
template itself (`vlmtrain.data.chat_format`). Spans are tokenized one by one (training needs the answer
boundary); a template string tokenized in one piece (what transformers' `apply_chat_template(tokenize=True)`
does) gives the same ids whenever no BPE merge crosses a span boundary, which holds for the chat families tested
(Qwen2.5, Qwen3, Llama 3, SmolLM2, Gemma 3: tests/test_lm_families.py): every boundary is next to a special token
or the header's newline, and answers not starting with whitespace do not merge into it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from vlmtrain.data.chat_format import (
    ChatFormat,
    TemplateError,
    at_one_instant,
    derive_chat_format,
    render,
    require_prefix,
)
from vlmtrain.data.tokenizer import IMAGE_TOKEN, image_token_id

# The instruction of caption samples when the data gives none (sharding, evaluation, `vlmtrain caption`).
CAPTION_PROMPT = "Write a short caption for the image."

# Shard conversation roles -> chat-template roles.
ROLES: Mapping[str, str] = {"human": "user", "gpt": "assistant"}

_PROMPT_CACHE_SIZE = 4096  # distinct prompt spans remembered per renderer (per worker)

Message = dict[str, str]


@dataclass(frozen=True)
class TurnPair:
    """Token ids of one (user, assistant) exchange, split where the assistant's answer starts."""

    prompt: Sequence[int]
    """Everything before the answer: earlier template text, the user turn and the assistant header."""
    answer: Sequence[int]
    """The answer content, the turn-end token and the template's turn suffix after it (e.g. "\\n")."""
    supervised: int
    """How many leading answer tokens are supervised (content + turn-end token)."""

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


@dataclass(frozen=True)
class Prompt:
    """One generation prompt: token ids with the image placeholders at the front when there is an image."""

    input_ids: list[int]
    has_image: bool


def messages_from_turns(turns: Sequence[Mapping[str, str]]) -> list[Message]:
    """Shard `conversations` ({'from': 'human'|'gpt', 'value'}) as chat messages ({'role', 'content'})."""
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]


def question_messages(question: str) -> list[Message]:
    """A single user turn awaiting an answer (evaluation, `caption`, one-shot `ask`)."""
    return [{"role": "user", "content": question}]


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Tokens that end an answer, the template's turn end first, then eos and pad (vlmtrain.data.chat_format)."""
    return derive_chat_format(tokenizer).stop_ids


class ChatRenderer:
    """Renders conversations with a tokenizer's own chat template and tokenizes them span by span.

    For each assistant turn i, the rendering of ``messages[:i]`` with the generation prompt marks where the
    answer starts and the rendering of ``messages[:i+1]`` where the turn ends. Each span is tokenized on its
    own, so the prompt tokens are exactly those generation starts from, and the answer tokens are what the
    model must emit.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, turn_end_token: str | None = None) -> None:
        # The turn end, suffix and answer prefix come from the template itself (derive_chat_format).
        self.format: ChatFormat = derive_chat_format(tokenizer)
        self.tokenizer = tokenizer
        self.turn_end_token = turn_end_token or self.format.turn_end
        ids = tokenizer.encode(self.turn_end_token, add_special_tokens=False)
        if len(ids) != 1:
            raise TemplateError(
                f"turn_end_token {self.turn_end_token!r} is not a single token in this tokenizer ({ids})"
            )
        self.turn_end_id = int(ids[0])
        # A fast tokenizer's Rust backend directly: the same ids without the Python wrapper's overhead.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._prompt_ids: dict[str, tuple[int, ...]] = {}

    # ---- spans ----------------------------------------------------------------------------------------
    def spans(self, messages: Sequence[Message]) -> list[tuple[str, str | None]]:
        """(prompt text, answer text) per user turn of alternating user/assistant ``messages``.

        The conversation is the template's rendering of all of it. Answer i starts where the rendering of
        ``messages[:i]`` with the generation prompt ends (after the template's answer prefix, if it writes one
        there) and ends after the first turn-end token that follows, plus the template's turn suffix.
        A conversation ending with a user turn is rendered with the generation prompt and its last span has
        answer None: its prompt text ends with the assistant header (and answer prefix) generation
        continues from.
        """
        if not messages:
            raise ValueError("a conversation needs at least one user turn")
        awaiting = len(messages) % 2 == 1
        full, headers = at_one_instant(
            lambda: (
                self._render(messages, add_generation_prompt=awaiting),
                # where each answer starts: the rendering before it, with the generation prompt
                [self._render(messages[:i], add_generation_prompt=True) for i in range(1, len(messages), 2)],
            ),
            lambda r: all(r[0].startswith(h) for h in r[1]),
        )
        fmt = self.format
        out: list[tuple[str, str | None]] = []
        done = 0
        for i in range(1, len(messages) + 1, 2):  # messages[i] answers messages[i - 1]
            if i == len(messages):
                out.append((full[done:] + fmt.answer_prefix, None))
                done = len(full)
                break
            header = headers[i // 2]
            require_prefix(full, header, i, add_generation_prompt=True)
            answer_start = len(header)
            # Qwen3's empty think block: written before the final answer, and by generation prompts that
            # ask for no thinking; a prompt, not something to learn (docs/data_pipeline.md).
            if fmt.answer_prefix and full.startswith(fmt.answer_prefix, answer_start):
                answer_start += len(fmt.answer_prefix)
            if answer_start < done:
                raise TemplateError(
                    f"chat template spans out of order at message {i}: {done}, {answer_start}"
                )
            end = full.find(self.turn_end_token, answer_start)
            if end < 0:
                raise TemplateError(
                    f"assistant turn {full[answer_start : answer_start + 80]!r} does not end with turn_end_token "
                    f"{self.turn_end_token!r}; set ProcessorConfig.turn_end_token to the token this chat "
                    "template closes turns with"
                )
            end += len(self.turn_end_token)
            if full.startswith(fmt.turn_suffix, end):
                end += len(fmt.turn_suffix)
            out.append((full[done:answer_start], full[answer_start:end]))
            done = end
        if done != len(full):
            raise TemplateError(
                f"the chat template renders text after the last assistant turn: {full[done:]!r}"
            )
        return out

    def tokenize_pairs(self, messages: Sequence[Message]) -> list[TurnPair]:
        """Token spans of a complete conversation (it ends with an assistant turn): what training learns from."""
        if len(messages) % 2:
            raise ValueError("tokenize_pairs needs complete (user, assistant) pairs")
        pairs = []
        for prompt, answer in self.spans(messages):
            assert answer is not None  # complete pairs: every span has its answer
            answer_ids = self.encode(answer)
            pairs.append(
                TurnPair(self.encode_prompt(prompt), answer_ids, self._supervised_length(answer_ids, answer))
            )
        return pairs

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Text ids of a conversation that ends with a user turn, through the assistant header.

        Equal to the prompt part training builds for the answer to that last turn: earlier pairs' prompt and
        answer spans, then the last prompt span.
        """
        if len(messages) % 2 != 1:
            raise ValueError("a generation prompt ends with a user turn (an odd number of messages)")
        ids: list[int] = []
        for prompt, answer in self.spans(messages):
            ids += self.encode_prompt(prompt)
            if answer is not None:
                ids += self.encode(answer)
        return ids

    def build_prompt(self, messages: Sequence[Message], has_image: bool, num_image_tokens: int) -> Prompt:
        """The generation prompt: image placeholders first (when there is an image), then `prompt_ids`."""
        prefix = [image_token_id(self.tokenizer)] * num_image_tokens if has_image else []
        return Prompt(prefix + self.prompt_ids(messages), has_image)

    # ---- tokens ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> tuple[int, ...]:
        """Prompts repeat across samples (caption/VQA instructions), so their ids are cached."""
        ids = self._prompt_ids.get(text)
        if ids is None:
            if len(self._prompt_ids) >= _PROMPT_CACHE_SIZE:
                self._prompt_ids.clear()
            ids = self._prompt_ids[text] = tuple(self.encode(text))
        return ids

    def _supervised_length(self, answer: Sequence[int], text: str) -> int:
        for pos in range(len(answer) - 1, -1, -1):
            if answer[pos] == self.turn_end_id:
                return pos + 1
        raise TemplateError(
            f"assistant turn {text!r} does not end with turn_end_token {self.turn_end_token!r}; set "
            "ProcessorConfig.turn_end_token to the token this chat template closes turns with"
        )

    # ---- template -------------------------------------------------------------------------------------
    def _render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        return render(self.tokenizer, list(messages), add_generation_prompt=add_generation_prompt)


# Converts transformers' multimodal messages ({"type": "image"} / {"type": "text", "text": ...} content items)
# to the text messages vlmtrain trains on, and puts the one image placeholder first, as training does; the
# tokenizer's own template then renders the text exactly as in training. String content passes unchanged.
_MULTIMODAL_PREAMBLE = (
    "{%- set vlm = namespace(images=0, messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set vlm.messages = vlm.messages + [message] -%}"
    "{%- else -%}"
    "{%- set part = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{%- set part.text = part.text + item['text'] -%}"
    "{%- elif item['type'] in ('image', 'image_url') -%}"
    "{%- set vlm.images = vlm.images + 1 -%}"
    "{%- else -%}"
    "{{- raise_exception('vlmtrain models read text and one image; got a ' ~ item['type'] ~ ' item') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set vlm.messages = vlm.messages + [{'role': message['role'], 'content': part.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if vlm.images > 1 -%}"
    "{{- raise_exception('vlmtrain models were trained with one image per conversation; got ' ~ vlm.images) -}}"
    "{%- endif -%}"
    "{%- if vlm.images == 1 -%}{{- '" + IMAGE_TOKEN + "' -}}{%- endif -%}"
    # No right trim: the text template's own leading whitespace, if any, is kept.
    "{%- set messages = vlm.messages %}"
)


def multimodal_chat_template(text_template: str, answer_prefix: str = "") -> str:
    """A chat template for transformers' processors that renders vlmtrain's training layout.

    Multimodal content lists become text (text items concatenated in order, as Qwen2-VL's template does); an
    image item anywhere in the conversation puts the single image placeholder before everything else; the
    tokenizer's `text_template` renders the rest. `answer_prefix` (ChatFormat.answer_prefix: Qwen3's empty
    think block) ends every generation prompt, as in training, unless the text template already wrote it
    (Qwen3 with enable_thinking=False). A template already wrapped is returned unchanged.
    """
    if text_template.startswith(_MULTIMODAL_PREAMBLE):
        return text_template
    if not answer_prefix:
        return _MULTIMODAL_PREAMBLE + text_template
    prefix = json.dumps(answer_prefix)  # a Jinja string literal with the same escapes
    return (
        _MULTIMODAL_PREAMBLE
        + "{%- set vlm_rendered -%}"  # the text template's output, captured to look at its end
        + text_template
        + "{%- endset -%}{{- vlm_rendered -}}"
        + f"{{%- if add_generation_prompt and not vlm_rendered.endswith({prefix}) -%}}{{{{- {prefix} -}}}}{{%- endif -%}}"
    )
