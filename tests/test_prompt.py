"""One path from sample to prompt: training's prompt part, the eval/ask prompt and the exported processor's
`apply_chat_template` give the same token ids, for a caption sample and a multi-turn question."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtrain.data.process import IGNORE_INDEX, ImageTransform, ProcessorConfig, RawSample, SampleProcessor
from vlmtrain.data.prompt import CAPTION_PROMPT, ChatRenderer, question_messages
from vlmtrain.data.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN
from vlmtrain.eval.generate import GenerationConfig, Generator
from vlmtrain.eval.run import answer_batch
from vlmtrain.export import export_hf

CAPTION = "a red circle on the left"
CHAT = [
    ("What color is the square?", "It is blue."),
    ("How many shapes are there?", "There are three shapes."),
]
# A template with a default system prompt (as Qwen2.5's has): the export must keep whatever the text template
# renders, not assume plain ChatML.
SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML_TEMPLATE
)


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def raw_sample(record: dict, image: bytes) -> RawSample:
    return RawSample("0000000000", "s.tar", 0, {"json": json.dumps(record).encode(), "png": image})


def last_prompt_part(input_ids: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Training ids before the last answer: up to the start of the last run of supervised labels."""
    supervised = (labels != IGNORE_INDEX).tolist()
    end = len(supervised)
    while not supervised[end - 1]:
        end -= 1
    start = end
    while supervised[start - 1]:
        start -= 1
    return input_ids[:start].tolist()


@pytest.fixture(params=["chatml", "system_prompt"])
def exported(request, tiny_model, tokenizer, tmp_path):
    tok = tokenizer
    if request.param == "system_prompt":
        from transformers import AutoTokenizer

        tokenizer.save_pretrained(str(tmp_path / "tok"))
        tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
        tok.chat_template = SYSTEM_TEMPLATE
    tiny_model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(str(tmp_path / "ckpt"))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    return tiny_model, tok, tmp_path / "hf", request.param


def test_training_eval_ask_and_export_prompts_are_equal(exported):
    from transformers import AutoProcessor

    model, tok, hf, template = exported
    n = model.num_image_tokens
    processor = AutoProcessor.from_pretrained(str(hf))
    train = SampleProcessor(tok, ProcessorConfig(max_length=512, num_image_tokens=n), ImageTransform(32))
    generator = Generator(model, tok, GenerationConfig(max_new_tokens=1))
    image = png(0)
    system = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if template == "system_prompt" else ""
    )

    # A caption sample: the training prompt part, the eval prompt and the exported template.
    caption = {
        "task": "caption",
        "conversations": [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": "x"}],
        "references": [CAPTION],
        "image": "a.png",
    }
    sample = train(raw_sample(caption, image))
    training = last_prompt_part(sample.input_ids, sample.labels)
    evaluation = generator.renderer.build_prompt(question_messages(CAPTION_PROMPT), True, n).input_ids
    pil = Image.open(io.BytesIO(image))
    hf_messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": pil}, {"type": "text", "text": CAPTION_PROMPT}],
        }
    ]
    hf_ids = processor.apply_chat_template(
        hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    expected = f"{system}<|im_start|>user\n{CAPTION_PROMPT}<|im_end|>\n<|im_start|>assistant\n"  # independent reference
    assert training[:n] == [model.image_token_id] * n
    assert tok.decode(training[n:]) == expected
    assert training == evaluation == list(hf_ids)
    # The answer after the prompt is the caption and the turn end, supervised.
    assert tok.decode(sample.input_ids[len(training) :]) == f"{CAPTION}<|im_end|>\n"

    # A multi-turn question: training's prompt part for the second answer == `ask`'s second prompt == export.
    record = {
        "task": "chat",
        "conversations": [
            {"from": role, "value": text} for q, a in CHAT for role, text in (("human", q), ("gpt", a))
        ],
        "image": "a.png",
    }
    sample = train(raw_sample(record, image))
    training = last_prompt_part(sample.input_ids, sample.labels)
    ask_messages = [
        {"role": "user", "content": CHAT[0][0]},
        {"role": "assistant", "content": CHAT[0][1]},
        {"role": "user", "content": CHAT[1][0]},
    ]
    ask = generator.prompt(ask_messages, True).input_ids
    hf_messages = [
        {"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": CHAT[0][0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": CHAT[0][1]}]},
        {"role": "user", "content": CHAT[1][0]},  # plain string content mixes with content lists
    ]
    hf_ids = processor.apply_chat_template(
        hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    expected = (
        f"{system}<|im_start|>user\n{CHAT[0][0]}<|im_end|>\n<|im_start|>assistant\n{CHAT[0][1]}<|im_end|>\n"
        f"<|im_start|>user\n{CHAT[1][0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(training[n:]) == expected
    assert training == ask == list(hf_ids)

    # The string form of the idiom (then `processor(images=..., text=...)`) renders one placeholder, first.
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}],
        add_generation_prompt=True,
    )
    assert (
        text
        == IMAGE_TOKEN + system + f"<|im_start|>user\n{CAPTION_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_eval_answer_batch_uses_the_shared_prompt(tiny_model, tokenizer, monkeypatch):
    """`answer_batch` (eval and validation) hands the Generator exactly the renderer's prompts."""
    from vlmtrain.eval.run import EvalSample

    generator = Generator(tiny_model, tokenizer, GenerationConfig(max_new_tokens=1))
    seen = []
    monkeypatch.setattr(
        generator, "generate", lambda prompts, pixels: seen.extend(prompts) or [[] for _ in prompts]
    )
    batch = [EvalSample("a", {}, torch.zeros(3, 32, 32)), EvalSample("b", {}, None)]
    answer_batch(generator, batch, [CAPTION_PROMPT, "hi"], tiny_model.num_image_tokens)
    renderer = ChatRenderer(tokenizer)
    n = tiny_model.num_image_tokens
    assert [p.input_ids for p in seen] == [
        renderer.build_prompt(question_messages(CAPTION_PROMPT), True, n).input_ids,
        renderer.build_prompt(question_messages("hi"), False, n).input_ids,
    ]
    assert [p.has_image for p in seen] == [True, False]


def test_export_template_rejects_what_training_never_saw(exported):
    from transformers import AutoProcessor

    _, _, hf, _ = exported
    processor = AutoProcessor.from_pretrained(str(hf))
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(Exception, match="one image per conversation"):
        processor.apply_chat_template(two, add_generation_prompt=True)
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(Exception, match="got a video item"):
        processor.apply_chat_template(video, add_generation_prompt=True)
