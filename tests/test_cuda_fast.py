"""The CUDA tests behind `attn_backend: auto` and `train.compile: auto` (vlmtrain.models.cuda_validation):
FlexAttention forward and backward against SDPA with the dense mask in bf16, its compile count over lengths,
and compiled training against eager. `benchmarks/gpu.sh` runs them and records the torch version they passed on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_compile import train, varying_batches
from test_flex import packed_layout
from transformers import AutoConfig, AutoModelForCausalLM

from vlmtrain.models.compile import apply_compile, graphs_compiled
from vlmtrain.models.language import attn_implementation
from vlmtrain.models.masks import flex_block_mask, sdpa_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only"),
]


def qwen_like(backend: str, dtype: torch.dtype):
    """Two Qwen2.5-0.5B-shaped layers (14 query heads on 2 KV heads, head size 64) with a small vocabulary."""
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=512,
        hidden_size=896,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation(backend))
    return lm.to("cuda", dtype).train()


def run(lm, mask, embeds):
    """Hidden states and the gradients of a fixed random projection of them (inputs and weights)."""
    embeds = embeds.detach().requires_grad_()
    hidden = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    probe = torch.randn(hidden.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
    (hidden.float() * probe).sum().backward()
    grads = {n: p.grad.float() for n, p in lm.named_parameters() if p.grad is not None}
    return hidden.float(), embeds.grad.float(), grads


@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
def test_flex_forward_backward_match_sdpa_bf16(mode):
    """bf16 flex and bf16 SDPA (dense mask) are each compared with fp32 SDPA: flex's error is at most twice
    SDPA's (+ a floor) on the output, the input gradient and every weight gradient. Packed rows of 1,024."""
    sample_ids, image_flags = (t.cuda() for t in packed_layout(seed=5, batch=2, length=1024))
    embeds = torch.randn(2, 1024, 896, device="cuda")
    ref = run(qwen_like("sdpa", torch.float32), sdpa_mask(mode, sample_ids, image_flags), embeds)
    sdpa = run(qwen_like("sdpa", torch.bfloat16), sdpa_mask(mode, sample_ids, image_flags), embeds.bfloat16())
    flex = run(
        qwen_like("flex", torch.bfloat16), flex_block_mask(mode, sample_ids, image_flags), embeds.bfloat16()
    )
    real = sample_ids > 0  # padding rows' outputs are ignored by the loss

    def err(a, b):
        return float((a - b).abs().max())

    pairs = [("hidden", flex[0][real], sdpa[0][real], ref[0][real]), ("d embeds", flex[1], sdpa[1], ref[1])]
    pairs += [(n, flex[2][n], sdpa[2][n], g) for n, g in ref[2].items()]
    assert len(pairs) > 20
    for name, f, s, r in pairs:
        assert err(f, r) <= 2 * err(s, r) + 1e-3 * float(r.abs().max()), name


def test_flex_compiles_once_across_lengths_cuda():
    """Mask builder + flex forward and backward over micro-batches of varying width and row count: nothing
    compiles after the first two shapes."""
    lm = qwen_like("flex", torch.bfloat16)
    counts = []
    for i, (rows, width) in enumerate([(2, 384), (3, 256), (2, 512), (4, 640), (3, 1024), (8, 2048)]):
        sample_ids, image_flags = (t.cuda() for t in packed_layout(seed=i, batch=rows, length=width))
        embeds = torch.randn(rows, width, 896, device="cuda", dtype=torch.bfloat16)
        run(lm, flex_block_mask("prefix", sample_ids, image_flags), embeds)
        lm.zero_grad()
        counts.append(graphs_compiled())
    assert counts[1] > 0 and counts[2:] == [counts[1]] * 4, counts


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_training_matches_eager_cuda(tiny_model, tmp_path, backend):
    """10 AdamW steps (fp32, TF32 off) of the tiny VLM, compiled layers + loss chunk vs eager: the same
    losses within 1e-3 relative, and no compile after the warm-up steps."""
    from test_model import with_backend

    torch.backends.cuda.matmul.allow_tf32 = False
    batches = [{k: v.cuda() for k, v in b.items()} for b in varying_batches(tiny_model, 5) * 2]
    base = with_backend(tiny_model, backend, tmp_path).cuda().train()
    ref, _ = train(copy.deepcopy(base), batches)
    model = copy.deepcopy(base)
    apply_compile(model, True)
    losses, graphs = train(model, batches)
    assert sum(ref[5:]) < sum(ref[:5])
    assert losses == pytest.approx(ref, rel=1e-3)
    assert graphs[-1] == graphs[1], graphs
