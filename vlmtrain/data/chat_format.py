"""The chat format of a tokenizer, read from its own chat template: turn end, answer prefix, eos, pad, stops.

Nothing here knows a model family. The template renders a probe conversation whose contents are sentinel
words, and the format is read off what surrounds the assistant contents:

    probe  = [user U1, assistant A1, user U2, assistant A2]
    full   = template(probe)                               ... U1 ... A1 <turn end><suffix> ... U2 ... A2 <turn end><suffix>
    prompt = template(probe[:3], add_generation_prompt)    ... U1 ... A1 <turn end><suffix> ... U2 ... <assistant header>

- turn end: the special token the template writes right after an assistant's content (`<|im_end|>` for
  ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma). Training supervises it, generation stops at it.
- suffix: what follows the turn end before the next turn ("\\n" for ChatML and Gemma, nothing for Llama 3).
- answer prefix: text the template writes between the generation prompt and the content of the answer it
  ends with (Qwen3 writes an empty `<think>\\n\\n</think>\\n\\n` there; other templates nothing). It is part of
  the prompt: `ChatRenderer` appends it to generation prompts and leaves it unsupervised in training.
- pad: the tokenizer's pad token; for a tokenizer without one (Llama 3) an existing special token the
  template never writes, preferring one named "pad" (`<|finetune_right_pad_id|>`), then "reserved", then eos.
  No embedding row is added. Labels and attention never read the pad id (they come from the spans and the
  sample ids), so any unused id is safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from vlmtrain.data.tokenizer import IMAGE_TOKEN

# Sentinel contents: lowercase letters only, so no template's trim/strip/split changes them.
_USERS = ("vlmtrainprobeuserone", "vlmtrainprobeusertwo")
_ANSWERS = ("vlmtrainprobeanswerone", "vlmtrainprobeanswertwo")

CHAT_TEMPLATE_FIX = (
    "set model.chat_template in the stage config to a Jinja chat template (the template string, or a path to "
    "a .jinja file), e.g. the chat_template of the instruct model released with this LM"
)


T = TypeVar("T")


class TemplateError(ValueError):
    """The tokenizer's chat template is missing or cannot be split into per-turn spans."""


@dataclass(frozen=True)
class ChatFormat:
    """What a chat template writes around assistant answers, and the ids generation and padding use."""

    turn_end: str
    """The special token closing an assistant turn (supervised; generation stops at it)."""
    turn_end_id: int
    """Its id."""
    turn_suffix: str
    """Text the template writes after the turn end, before the next turn (unsupervised)."""
    answer_prefix: str
    """Text between the generation prompt and the content of the final answer (part of the prompt)."""
    eos_id: int | None
    """The tokenizer's eos id (a stop token too)."""
    pad_token: str
    """The pad token: the tokenizer's own, or the existing special token chosen for it."""
    pad_id: int
    """Its id: the value of padded input positions (never read by labels or masks)."""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer, the turn end first: turn end, eos, pad (each once)."""
        ids: list[int] = []
        for i in (self.turn_end_id, self.eos_id, self.pad_id):
            if i is not None and i not in ids:
                ids.append(int(i))
        return tuple(ids)


def load_chat_template(value: str) -> str:
    """`model.chat_template`: a path to a .jinja file (read) or the template text itself."""
    stripped = value.strip()
    looks_like_path = "\n" not in stripped and "{" not in stripped
    if looks_like_path:
        path = Path(stripped).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.chat_template {value!r} is neither a Jinja template nor an existing file; give the "
                "template text or the path of a .jinja file"
            )
        return path.read_text()
    return value


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> ChatFormat:
    """Install `chat_template` (when given), derive the chat format and set the chosen pad token.

    The tokenizer is changed in place, so the tokenizer saved with a stage output carries the template and
    the pad token, and every later load (evaluation, export, the next stage) derives the same format.
    """
    if chat_template is not None:
        tokenizer.chat_template = load_chat_template(chat_template)
    fmt = derive_chat_format(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = fmt.pad_token
    return fmt


def derive_chat_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The chat format of `tokenizer`, read from renderings of its own chat template."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer {name!r} has no chat template (a base LM?), so vlmtrain cannot tell where answers "
            f"start and end; {CHAT_TEMPLATE_FIX}"
        )
    probe = [
        {"role": "user", "content": _USERS[0]},
        {"role": "assistant", "content": _ANSWERS[0]},
        {"role": "user", "content": _USERS[1]},
        {"role": "assistant", "content": _ANSWERS[1]},
    ]
    full, prompt = at_one_instant(
        lambda: (
            render(tokenizer, probe, add_generation_prompt=False),
            render(tokenizer, probe[:3], add_generation_prompt=True),
        ),
        lambda r: r[0].startswith(r[1]),
    )
    require_prefix(full, prompt, 3, add_generation_prompt=True)
    positions = []
    for answer in _ANSWERS:
        if full.count(answer) != 1:
            raise TemplateError(
                f"the chat template of {name!r} does not render an assistant's content verbatim (probe "
                f"{answer!r} appears {full.count(answer)} times in {full!r}); {CHAT_TEMPLATE_FIX}"
            )
        positions.append(full.index(answer))
    after_first = full[positions[0] + len(_ANSWERS[0]) :]
    after_last = full[positions[1] + len(_ANSWERS[1]) :]
    turn_end, turn_end_id = _leading_special_token(tokenizer, after_first, name)
    if not after_last.startswith(turn_end):
        raise TemplateError(
            f"the chat template of {name!r} closes the first assistant turn with {turn_end!r} but the last one "
            f"with {after_last[:40]!r}; {CHAT_TEMPLATE_FIX}"
        )
    suffix = _common_prefix(after_first[len(turn_end) :], after_last[len(turn_end) :])
    answer_prefix = full[len(prompt) : positions[1]]
    pad_token, pad_id = _pad(tokenizer, exclude_text=full + prompt, turn_end=turn_end, name=name)
    return ChatFormat(
        turn_end=turn_end,
        turn_end_id=turn_end_id,
        turn_suffix=suffix,
        answer_prefix=answer_prefix,
        eos_id=tokenizer.eos_token_id,
        pad_token=pad_token,
        pad_id=pad_id,
    )


def at_one_instant(renderings: Callable[[], T], consistent: Callable[[T], bool]) -> T:
    """`renderings()`, taken again once when they disagree.

    Templates may read the clock (Llama 3.1+ writes today's date into the system turn through transformers'
    `strftime_now`, which a caller cannot pin: the template sandbox receives plain data only), so renderings of
    one conversation made just before and after midnight differ. They are redone once; a template that is
    really inconsistent disagrees again and the caller reports it.
    """
    first = renderings()
    return first if consistent(first) else renderings()


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """The template's text for `messages` (never tokenized here)."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def require_prefix(full: str, prefix: str, n_messages: int, *, add_generation_prompt: bool) -> None:
    """Span splitting needs each shorter rendering to be how the longer one starts."""
    if not full.startswith(prefix):
        raise TemplateError(
            "the chat template is not prefix-consistent: rendering the first "
            f"{n_messages} messages{' with the generation prompt' if add_generation_prompt else ''} "
            f"gives {prefix[-80:]!r} at the end, which is not how the full conversation starts. Label "
            "spans cannot be derived; use a template whose earlier turns render the same in longer chats "
            "(model.chat_template)."
        )


def _leading_special_token(tokenizer: Any, text: str, name: str) -> tuple[str, int]:
    """The special token `text` starts with (the turn end after an assistant's content)."""
    for token_id, token in sorted(_special_added_tokens(tokenizer).items(), key=lambda t: -len(t[1])):
        if text.startswith(token):
            return token, token_id
    raise TemplateError(
        f"the chat template of {name!r} follows an assistant's content with {text[:40]!r}, which does not "
        "start with a special token; vlmtrain supervises the token that closes an answer so the model learns "
        f"to stop, and generation stops at it; {CHAT_TEMPLATE_FIX}"
    )


def _special_added_tokens(tokenizer: Any) -> dict[int, str]:
    """Added tokens marked special (every chat-control token of the families we know is one)."""
    out = {int(i): t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token, token_id in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True):
        out.setdefault(int(token_id), token)
    return out


def _pad(tokenizer: Any, *, exclude_text: str, turn_end: str, name: str) -> tuple[str, int]:
    if tokenizer.pad_token_id is not None:
        return str(tokenizer.pad_token), int(tokenizer.pad_token_id)
    used = {turn_end, IMAGE_TOKEN, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token}
    free = [
        (i, tok)
        for i, tok in sorted(_special_added_tokens(tokenizer).items())
        if tok not in used and tok not in exclude_text
    ]
    for word in ("pad", "reserved"):
        for i, tok in free:
            if word in tok.lower():
                return tok, i
    if tokenizer.eos_token_id is None:
        raise TemplateError(
            f"the tokenizer {name!r} has no pad token, no unused special token and no eos to pad with; add a "
            "pad token to the tokenizer (and resize the LM's embeddings) before training"
        )
    return str(tokenizer.eos_token), int(tokenizer.eos_token_id)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
