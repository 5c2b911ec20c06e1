"""Fast checks of the flex / compile plumbing: 128-aligned rows in every batching path, the `auto` decisions
from the CUDA record, and the loss-chunk compile hook."""

from __future__ import annotations

import json

import pytest
import torch
from test_collate import make_samples, reference_rows
from test_compile import varying_batches

from vlmtrain.data.collate import make_collate
from vlmtrain.models import compile as vcompile
from vlmtrain.models import cuda_validation, language, loss
from vlmtrain.models.masks import FLEX_BLOCK_SIZE

KINDS = {"padded": {}, "packed": {"pack_length": 300}, "budget": {"pack_length": 300, "token_budget": 1200}}


def rows_of(batch: dict) -> list[dict]:
    return batch.get("micro_batches", [batch])


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("seed", range(3))
def test_every_batching_path_aligns_rows_to_the_flex_tile(kind, seed):
    """With width_multiple=128 each path's rows are multiples of 128 wide and hold the same token layout as
    the unaligned path's rows (token by token, padding after): only padding is added."""
    samples = make_samples(seed, 12, 250)
    common = {"pad_token_id": 0, "max_length": 250, "image_size": 8, **KINDS[kind]}
    aligned = rows_of(make_collate(width_multiple=FLEX_BLOCK_SIZE, **common)(samples))
    plain = rows_of(make_collate(**common)(samples))
    for micro in aligned:
        assert micro["input_ids"].shape[1] % FLEX_BLOCK_SIZE == 0, micro["input_ids"].shape
    if kind == "padded":
        assert aligned[0]["input_ids"].shape[1] == 256 >= plain[0]["input_ids"].shape[1]
    # Same samples in the same rows: each aligned row is the unaligned row's layout padded further.
    by_key = {s.key: s for s in samples}
    for micro in aligned:
        width = micro["input_ids"].shape[1]
        ref = reference_rows(_rows_from(micro, by_key), width)
        for name, values in ref.items():
            assert micro[name].tolist() == [[int(v) for v in row] for row in values], name
    # Every sample exactly once (wider packed rows may hold other combinations of samples).
    assert sorted(k for m in aligned for k in m["keys"]) == sorted(s.key for s in samples)
    if kind == "packed":
        assert aligned[0]["input_ids"].shape[1] == 384  # pack_length 300 rounded up
    assert sum(m["num_tokens"] for m in aligned) == sum(len(s) for s in samples)


def _rows_from(micro: dict, by_key: dict) -> list[list]:
    """The samples of each row, in order, read back from the batch's keys and sample ids."""
    keys = iter(micro["keys"])
    return [[by_key[next(keys)] for _ in range(int(row.max()))] for row in micro["sample_ids"]]


def test_a_budget_below_the_aligned_row_is_refused():
    samples = make_samples(0, 4, 200)
    with pytest.raises(ValueError, match=r"token_budget=300 .* rounded up to a multiple of 128.* = 384"):
        make_collate(pad_token_id=0, max_length=300, image_size=8, token_budget=300, width_multiple=128)(
            samples
        )


@pytest.fixture
def record(tmp_path, monkeypatch):
    path = tmp_path / "cuda_validated.json"
    monkeypatch.setattr(cuda_validation, "RECORD", path)
    return path


def junit(path, cases: dict[str, str]) -> None:
    """A pytest JUnit report: test name -> 'pass' | 'fail' | 'skip'."""
    body = "".join(
        f'<testcase classname="tests.test_cuda_fast" name="{n}">'
        + {"pass": "", "fail": '<failure message="x"/>', "skip": '<skipped message="no CUDA"/>'}[r]
        + "</testcase>"
        for n, r in cases.items()
    )
    path.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'
    )


def test_auto_picks_flex_and_compile_on_cuda_only_for_a_recorded_torch(record, tmp_path, monkeypatch):
    """No CUDA -> sdpa / no compile; CUDA without a record for this torch -> the same, saying so; `record`
    refuses a report with a failed or skipped CUDA test and accepts one where all passed; then auto picks
    flex and compile, naming the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert language.resolve_attn_backend("auto") == "sdpa"
    assert vcompile.resolve_compile("auto") == (False, "train.compile auto: no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    use, why = cuda_validation.cuda_fast_path("flex attention", record)
    assert not use and "have not passed for torch" in why and "gpu.sh" in why
    report = tmp_path / "junit.xml"
    names = cuda_validation.REQUIRED_TESTS
    for bad in ("fail", "skip"):
        junit(
            report,
            {n + "[prefix]": ("pass" if i else bad) for i, n in enumerate(names)}
            | {names[0] + "[causal]": "pass"},
        )
        with pytest.raises(SystemExit, match=f"not passed .*{names[0]}"):
            cuda_validation.record(report, record)
        assert not record.exists()
    junit(report, {n: "pass" for n in names})
    cuda_validation.record(report, record)
    entry = json.loads(record.read_text())["torch_versions"][torch.__version__]
    assert entry["device"] == "NVIDIA H100 80GB HBM3" and entry["tests"] == list(names)
    assert cuda_validation.cuda_fast_path("flex attention", record)[0]
    assert language.resolve_attn_backend("auto") == "flex"
    assert language.resolve_attn_backend("sdpa") == "sdpa"
    assert vcompile.resolve_compile("auto")[0] and vcompile.resolve_compile(False)[0] is False
    assert "auto -> flex (flex attention: the CUDA tests passed" in language.describe_attn_backend(
        "auto", "flex"
    )


def test_compile_loss_chunk_routes_this_models_loss_through_the_compiled_chunks(tiny_model, monkeypatch):
    """The flag set by compile_loss_chunk makes this model's forward take loss.compiled_chunk_fns (counted
    here, handing back the eager functions so the test compiles nothing) and leaves another model eager; the
    loss is the same either way."""
    calls = []

    def counted():
        calls.append(1)
        return loss.ChunkFns(loss.forward_chunk, loss.backward_chunk)

    monkeypatch.setattr(loss, "compiled_chunk_fns", counted)
    batch = varying_batches(tiny_model, 1)[0]
    eager = tiny_model(**batch, mask_mode="prefix").loss
    assert calls == []
    vcompile.compile_loss_chunk(tiny_model, True)
    assert tiny_model(**batch, mask_mode="prefix").loss == eager and calls == [1]
    vcompile.compile_loss_chunk(tiny_model, False)
    tiny_model(**batch, mask_mode="prefix")
    assert calls == [1]


def test_train_compile_is_validated():
    from vlmtrain.config.schema import TrainConfig, ValidationError

    TrainConfig(compile=True).validate("train")
    with pytest.raises(ValidationError, match=r"train.compile.*must be \"auto\", true or false"):
        TrainConfig(compile="yes").validate("train")


def test_cider_validation_refuses_auto_where_it_resolves_to_flex(record, tmp_path, monkeypatch):
    """CIDEr generates with a KV cache (sdpa / eager only): `auto` is refused where it means flex, at the
    start of the stage, and accepted where it means sdpa."""
    import dataclasses

    from vlmtrain.config.load import load_stage_config
    from vlmtrain.eval import java
    from vlmtrain.train.validation import Validator

    monkeypatch.setattr(java, "require_java", lambda: None)
    stage = load_stage_config(stage=2)
    stage = dataclasses.replace(
        stage,
        model=dataclasses.replace(stage.model, attn_backend="auto"),
        validation=dataclasses.replace(stage.validation, cider=True),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    Validator(stage, None, None, None, tmp_path / "v.jsonl")  # no record for this torch: sdpa
    record.write_text(json.dumps({"torch_versions": {torch.__version__: {"device": "H100"}}}))
    with pytest.raises(ValueError, match=r"validation.cider .*\(it is 'auto', which is flex here\)"):
        Validator(stage, None, None, None, tmp_path / "v.jsonl")
