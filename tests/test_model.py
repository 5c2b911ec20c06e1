"""The VLM against independent references: eager attention, transformers' LLaVA, unpacked runs, reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vlmtrain.models.vlm import VisionLanguageModel

MODES = ["bidirectional", "prefix", "causal"]


def make_sample(model, gen: torch.Generator, n_text: int, with_image: bool) -> dict:
    p = model.num_image_tokens if with_image else 0
    text = torch.randint(10, 300, (n_text,), generator=gen)
    ids = torch.cat([torch.full((p,), model.image_token_id), text])
    labels = ids.clone()
    labels[:p] = -100
    labels[p : p + 2] = -100  # an unsupervised prompt, as real samples have
    flags = torch.zeros(p + n_text, dtype=torch.bool)
    flags[:p] = True
    pixels = torch.randn(1, 3, 32, 32, generator=gen) if with_image else None
    return {"ids": ids, "labels": labels, "flags": flags, "pixels": pixels}


def pack(samples: list[dict], rows: list[list[int]], length: int) -> dict:
    """Lay samples out in rows (indices per row), right-padded to `length`."""
    b = len(rows)
    batch = {
        "input_ids": torch.zeros(b, length, dtype=torch.long),
        "labels": torch.full((b, length), -100),
        "image_flags": torch.zeros(b, length, dtype=torch.bool),
        "sample_ids": torch.zeros(b, length, dtype=torch.long),
    }
    pixels = []
    for r, members in enumerate(rows):
        t = 0
        for k, i in enumerate(members, start=1):
            s = samples[i]
            n = len(s["ids"])
            batch["input_ids"][r, t : t + n] = s["ids"]
            batch["labels"][r, t : t + n] = s["labels"]
            batch["image_flags"][r, t : t + n] = s["flags"]
            batch["sample_ids"][r, t : t + n] = k
            if s["pixels"] is not None:
                pixels.append(s["pixels"])
            t += n
    batch["pixel_values"] = torch.cat(pixels) if pixels else torch.zeros(0, 3, 32, 32)
    return batch


@pytest.fixture
def mixed_batch(tiny_model):
    gen = torch.Generator().manual_seed(1)
    samples = [
        make_sample(tiny_model, gen, 9, True),
        make_sample(tiny_model, gen, 7, False),  # text-only sample
        make_sample(tiny_model, gen, 12, True),
        make_sample(tiny_model, gen, 5, True),
    ]
    return samples, pack(samples, [[0, 1], [2], [3]], length=48)


def with_backend(model: VisionLanguageModel, backend: str, tmp_path) -> VisionLanguageModel:
    model.save_pretrained(tmp_path / backend)
    return VisionLanguageModel.from_pretrained(tmp_path / backend, attn_backend=backend).eval()


@pytest.mark.parametrize("mode", MODES)
def test_sdpa_equals_eager(tiny_model, mixed_batch, tmp_path, mode):
    _, batch = mixed_batch
    eager = with_backend(tiny_model, "eager", tmp_path)
    with torch.no_grad():
        ref = eager(**batch, mask_mode=mode, return_logits=True)
        out = tiny_model(**batch, mask_mode=mode, return_logits=True)
    real = batch["sample_ids"] > 0
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bidirectional", "prefix"])
def test_flex_forward_equals_eager(tiny_model, mixed_batch, tmp_path, mode):
    _, batch = mixed_batch
    eager = with_backend(tiny_model, "eager", tmp_path)
    flex = with_backend(tiny_model, "flex", tmp_path)
    with torch.no_grad():
        ref = eager(**batch, mask_mode=mode, return_logits=True)
        out = flex(**batch, mask_mode=mode, return_logits=True)
    real = batch["sample_ids"] > 0
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward runs on CUDA only")
def test_flex_backward_equals_sdpa_on_cuda(tiny_model, mixed_batch, tmp_path):
    _, batch = mixed_batch
    batch = {k: v.cuda() for k, v in batch.items()}
    grads = {}
    for backend in ("sdpa", "flex"):
        model = with_backend(tiny_model, backend, tmp_path).cuda().train()
        model(**batch, mask_mode="prefix").loss.backward()
        grads[backend] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["flex"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) > 10
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward runs on CUDA only")
@pytest.mark.parametrize("mode", ["bidirectional", "prefix"])
def test_flex_training_steps_match_sdpa_on_cuda(tiny_model, mixed_batch, tmp_path, mode):
    """A few AdamW steps from the same weights on the same packed batch: the losses agree step by step."""
    _, batch = mixed_batch
    batch = {k: v.cuda() for k, v in batch.items()}
    losses: dict[str, list[float]] = {}
    for backend in ("sdpa", "flex"):
        model = with_backend(tiny_model, backend, tmp_path).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[backend] = []
        for _ in range(4):
            out = model(**batch, mask_mode=mode)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(out.loss.item())
    assert losses["sdpa"][-1] < losses["sdpa"][0]  # the steps move the weights
    assert losses["flex"] == pytest.approx(losses["sdpa"], rel=1e-4)


def to_llava(model: VisionLanguageModel) -> LlavaForConditionalGeneration:
    cfg = LlavaConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=model.language.config.to_dict(),
        image_token_id=model.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=model.vision_feature_layer,
        multimodal_projector_bias=True,
        image_seq_length=model.num_image_tokens,
    )
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.model.vision_tower.load_state_dict(model.vision.state_dict())
    llava.model.multi_modal_projector.load_state_dict(model.projector.state_dict(), strict=False)
    llava.model.language_model.load_state_dict(model.language.get_decoder().state_dict())
    llava.lm_head.load_state_dict(model.language.get_output_embeddings().state_dict())
    return llava


def test_causal_mode_equals_transformers_llava(tiny_model, mixed_batch):
    """LLaVA (SigLIP + GELU projector + Qwen2) in transformers is an independent implementation."""
    samples, _ = mixed_batch
    llava = to_llava(tiny_model)
    # One sample per row, right-padded: LLaVA takes a 2D padding mask and builds the causal mask itself.
    for idx in ([0, 2], [1]):
        batch = pack(samples, [[i] for i in idx], length=40)
        attn = (batch["sample_ids"] > 0).long()
        with torch.no_grad():
            ours = tiny_model(**batch, mask_mode="causal", return_logits=True)
            kwargs = {"pixel_values": batch["pixel_values"]} if batch["pixel_values"].shape[0] else {}
            ref = llava(input_ids=batch["input_ids"], attention_mask=attn, labels=None, **kwargs)
        real = attn.bool()
        torch.testing.assert_close(ours.logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
        # Loss: transformers' causal-LM loss on the same labels (pads are -100 already).
        ref_loss = torch.nn.functional.cross_entropy(
            ref.logits[:, :-1].reshape(-1, ref.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        )
        torch.testing.assert_close(ours.loss, ref_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_packed_row_equals_samples_one_by_one(tiny_model, mixed_batch, mode):
    samples, packed = mixed_batch
    with torch.no_grad():
        out = tiny_model(**packed, mask_mode=mode)
        per_sample_packed = []
        for r in range(packed["sample_ids"].shape[0]):
            for sid in packed["sample_ids"][r].unique().tolist():
                if sid:
                    per_sample_packed.append(out.token_loss[r][packed["sample_ids"][r] == sid].sum())
        per_sample_single = []
        for i in (0, 1, 2, 3):
            single = pack(samples, [[i]], length=len(samples[i]["ids"]))
            per_sample_single.append(tiny_model(**single, mask_mode=mode).token_loss.sum())
    torch.testing.assert_close(
        torch.stack(per_sample_packed), torch.stack(per_sample_single), atol=1e-5, rtol=1e-5
    )


def test_save_load_round_trip_is_bitwise(tiny_model, mixed_batch, tmp_path):
    _, batch = mixed_batch
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        a = tiny_model(**batch, mask_mode="prefix", return_logits=True).logits
        b = loaded(**batch, mask_mode="prefix", return_logits=True).logits
    assert torch.equal(a, b)
    for (na, pa), (nb, pb) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert not list(tmp_path.glob("m/*.tmp")), "temporary files left behind"


def test_load_refuses_missing_or_unsafe_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="not a vlmtrain model directory"):
        VisionLanguageModel.from_pretrained(tmp_path / "x")


def test_image_token_count_mismatch_is_explained(tiny_model, mixed_batch):
    _, batch = mixed_batch
    bad = dict(batch, pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="image-token positions"):
        tiny_model(**bad)


def test_frozen_vision_runs_without_autograd(tiny_model, mixed_batch):
    _, batch = mixed_batch
    tiny_model.vision.requires_grad_(False)
    seen = []
    handle = tiny_model.vision.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    tiny_model.train()
    tiny_model(**batch).loss.backward()
    handle.remove()
    assert seen == [False]
    assert tiny_model.projector.linear_1.weight.grad is not None


def test_components_load_from_local_checkpoints(tmp_path, tokenizer):
    """A full SigLIP checkpoint (vision + text towers) and a Qwen2 checkpoint load by directory, as hub ids do."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel

    from tests.conftest import TINY_VISION, tiny_language_config
    from vlmtrain.config.schema import ModelConfig

    torch.manual_seed(0)
    text_cfg = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 99,
        "max_position_embeddings": 16,
    }
    siglip = SiglipModel(SiglipConfig(text_config=text_cfg, vision_config=TINY_VISION))
    siglip.save_pretrained(tmp_path / "siglip")
    lm_cfg = tiny_language_config(len(tokenizer))
    lm_cfg.pop("model_type")
    qwen = Qwen2ForCausalLM(Qwen2Config(**lm_cfg))
    qwen.save_pretrained(tmp_path / "qwen")
    model = VisionLanguageModel.from_config(
        ModelConfig(vision=str(tmp_path / "siglip"), language=str(tmp_path / "qwen")), tokenizer
    )
    for name, p in model.vision.named_parameters():
        assert torch.equal(p, siglip.vision_model.state_dict()[name]), name
    for name, p in model.language.named_parameters():
        assert torch.equal(p, qwen.state_dict()[name]), name


def test_auto_backend_resolves_to_sdpa_without_cuda(tokenizer, tiny_model_config, monkeypatch):
    """Without CUDA `auto` is SDPA (on CUDA: flex once recorded; tests/test_flex_policy.py)."""
    import dataclasses

    from vlmtrain.models.language import resolve_attn_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_attn_backend("auto") == "sdpa"
    assert [resolve_attn_backend(b) for b in ("sdpa", "flex", "eager")] == ["sdpa", "flex", "eager"]
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attn_backend("flash")
    model = VisionLanguageModel.from_config(
        dataclasses.replace(tiny_model_config, attn_backend="auto"), tokenizer
    )
    assert model.attn_backend == "sdpa"
    assert model.language.config._attn_implementation == "sdpa"
