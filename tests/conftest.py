"""Shared fixtures: a tokenizer built here and tiny random-init SigLIP / Qwen2 models of the real classes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

CORPUS = [
    "a red circle on the left",
    "two blue squares at the top",
    "a small green triangle in the center",
    "How many shapes are there?",
    "There are three shapes: a red circle, a blue square and a green triangle.",
    "What color is the square? It is blue.",
    "The image shows a yellow star on a white background.",
    "Describe the image in detail.",
    "Write a short caption for the image.",
    "yes no left right top bottom large small",
]

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
}


def tiny_language_config(vocab_size: int) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    }


@pytest.fixture(scope="session")
def tokenizer():
    from vlmtrain.data.tokenizer import build_tokenizer

    return build_tokenizer(CORPUS * 20, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_config(tokenizer):
    from vlmtrain.config.schema import ModelConfig

    return ModelConfig(
        vision=None,
        vision_config=TINY_VISION,
        language=None,
        language_config=tiny_language_config(len(tokenizer)),
    )


@pytest.fixture
def tiny_model(tokenizer, tiny_model_config):
    from vlmtrain.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(tiny_model_config, tokenizer).eval()
