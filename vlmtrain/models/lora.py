"""LoRA on module groups through PEFT: attach adapters, fingerprint the frozen base, save, load and merge them.

A group with `modules.<group>.lora` keeps its weights frozen and trains PEFT LoRA adapters injected in place
(`peft.LoraModel` on the group's module, which is what `inject_adapter_in_model` does), so parameter names stay
the model's own (`language.model.layers.0.self_attn.q_proj.lora_A.default.weight`) and the engines, the
optimizer groups and the resumable checkpoints see ordinary trainable parameters.

A LoRA stage's output folder holds the adapters (PEFT's `get_peft_model_state_dict` keys), the fully trained
groups, and `lora.json`: where the frozen base came from (the `init_from` directory, or the component
checkpoints and seed it was built from) and a sha256 over the frozen base tensors. Loading the folder rebuilds
the base, checks the fingerprint (another base is an error, never a silent mix), loads the adapters with
`set_peft_model_state_dict` and merges them with `merge_and_unload`: every consumer (a later stage, eval,
caption, export) gets a plain VisionLanguageModel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import LoraModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from vlmtrain.config.schema import LoraConfig, ModelConfig, ModuleGroupConfig
from vlmtrain.durable import fsync_file, write_text_durably
from vlmtrain.models.vlm import CONFIG_NAME, VisionLanguageModel

ADAPTER_NAME = "default"
RECORD_NAME = "lora.json"
"""A LoRA stage output: the base's source and fingerprint, the adapters' settings, the files below."""
ADAPTERS_NAME = "adapter_model.safetensors"
"""Adapter tensors, `<group>.<PEFT state-dict key>`."""
TRAINED_NAME = "trained.safetensors"
"""The fully trained groups' parameters (e.g. the projector), by model parameter name."""
FORMAT = 1
QUANTIZABLE_GROUPS = ("language",)


class LoraBaseMismatch(ValueError):
    """A LoRA checkpoint loaded (or resumed) onto a base whose frozen weights are not the ones it trained on."""


class QuantizeUnsupported(RuntimeError):
    """`lora.quantize` asked for where bitsandbytes 4-bit cannot run."""


@dataclass(frozen=True)
class LoraBase:
    """Where a LoRA stage's frozen base came from: enough to build it again."""

    init_from: str | None
    """Absolute directory of the vlmtrain model the stage started from (None: built from `model`)."""
    model: dict[str, Any]
    """The stage's resolved `model` block (component checkpoints: `vision`, `language`, `tokenizer`)."""
    seed: int
    """`train.seed`: a base built from `model` draws its random parts (projector, new embedding rows) with it."""


@dataclass
class LoraState:
    """The adapters attached to a model (kept on it as `model.lora_state`; not a submodule)."""

    groups: dict[str, LoraConfig]
    tuners: dict[str, LoraModel]
    fingerprint: str
    """sha256 over the frozen base parameters (names, dtypes, shapes, bytes) before the adapters were added."""
    base: LoraBase | None = None
    merged: bool = field(default=False)


# ---- attach -------------------------------------------------------------------------------------------


def lora_state(model: nn.Module) -> LoraState | None:
    """The model's attached (unmerged) adapters, or None."""
    state = model.__dict__.get("lora_state")
    return None if state is None or state.merged else state


def fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over tensors sorted by name: each name, dtype, shape and raw bytes (any dtype, any device)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return "sha256:" + digest.hexdigest()


def frozen_base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every parameter that does not train: the part of the model a LoRA output does not hold."""
    return fingerprint((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def peft_config(cfg: LoraConfig, exclude: Iterable[str] = ()) -> PeftLoraConfig:
    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    excluded = sorted(exclude)
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        exclude_modules=excluded or None,
        bias="none",
    )


def _unused_module_names(module: nn.Module, unused: set[int]) -> set[str]:
    """Submodules owning a parameter no forward reaches: adapters there would never get a gradient."""
    return {
        name
        for name, sub in module.named_modules()
        if name and any(id(p) in unused for p in sub.parameters(recurse=False))
    }


def attach_lora(
    model: VisionLanguageModel,
    modules: Mapping[str, ModuleGroupConfig],
    seed: int = 0,
    base: LoraBase | None = None,
) -> LoraState | None:
    """Inject adapters into every group with `lora` (its base weights already frozen); None when there is none.

    The fingerprint is taken first, over every frozen parameter. Adapter initialisation (PEFT: A Kaiming-uniform,
    B zero) draws from a generator seeded by (seed, group) inside a forked RNG, so every rank builds the same
    adapters and the training RNG stream is untouched.
    """
    configs = {g: m.lora for g, m in modules.items() if m.lora is not None}
    if not configs:
        return None
    if lora_state(model) is not None:
        raise RuntimeError("the model already has LoRA adapters attached; merge them (merge_lora) first")
    groups = model.module_groups()
    for group, cfg in configs.items():
        if cfg.quantize is not None:
            check_quantize_supported(group, cfg)
    state = LoraState(configs, {}, frozen_base_fingerprint(model), base)
    unused = {id(p) for p in model.unused_parameters()}
    for index, (group, cfg) in enumerate(sorted(configs.items())):
        module = groups[group]
        if cfg.quantize is not None:
            module = quantize_group(model, group)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + index)
            try:
                tuner = LoraModel(
                    module, peft_config(cfg, _unused_module_names(module, unused)), ADAPTER_NAME
                )
            except ValueError as err:  # PEFT: no module matched target_modules
                raise ValueError(
                    f"modules.{group}.lora.target_modules={cfg.target_modules!r}: {err}; name suffixes of "
                    f'the group\'s linear layers (e.g. q_proj, fc1, linear_1) or use "all-linear"'
                ) from None
        state.tuners[group] = tuner
        if adapter_parameter_count(module) == 0:
            raise ValueError(f"modules.{group}.lora: no adapter was created; check target_modules")
    model.lora_state = state
    return state


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters inside `module` (each PEFT tuner layer's adapter sub-modules), each once."""
    seen: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):
            for attr in sub.adapter_layer_names:
                for p in getattr(sub, attr).parameters():
                    seen.setdefault(id(p), p)
    return list(seen.values())


def adapter_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in adapter_parameters(module))


# ---- merge --------------------------------------------------------------------------------------------


def merge_lora(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fold every attached adapter into its base weight (PEFT's `merge_and_unload`); a no-op without adapters.

    The merged model has the base architecture again (plain nn.Linear layers), so it saves, exports and
    trains as any other. The export calls this before it maps weights.
    """
    state = lora_state(model)
    if state is None:
        return model
    for group, tuner in state.tuners.items():
        merged = tuner.merge_and_unload()
        setattr(model, group, merged)  # the same module object, its LoRA layers replaced by merged Linears
    state.merged = True
    return model


# ---- QLoRA --------------------------------------------------------------------------------------------


def check_quantize_supported(group: str, cfg: LoraConfig) -> None:
    """Refuse `quantize` where bitsandbytes 4-bit cannot run, naming why and the fix."""
    path = f"modules.{group}.lora.quantize"
    if group not in QUANTIZABLE_GROUPS:
        raise QuantizeUnsupported(
            f"{path}={cfg.quantize!r}: only the language group can be held in 4 bits (it is loaded through "
            f"transformers' BitsAndBytesConfig); remove `quantize` from modules.{group}.lora"
        )
    if not torch.cuda.is_available():
        raise QuantizeUnsupported(
            f"{path}={cfg.quantize!r} needs a CUDA GPU: bitsandbytes' 4-bit kernels run on CUDA only, and this "
            "process sees none; run on a GPU, or remove `quantize` to train plain LoRA on a bf16/fp32 base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizeUnsupported(
            f"{path}={cfg.quantize!r} needs the bitsandbytes package, which is not installed; "
            "`pip install bitsandbytes` (or `pip install -e '.[qlora]'`), or remove `quantize`"
        )


def quantize_group(model: VisionLanguageModel, group: str) -> nn.Module:
    """The language model reloaded with 4-bit NF4 linear layers (transformers' BitsAndBytesConfig), in place.

    The LM (whatever its source: a checkpoint, an init_from stage, a built config) is written to a temporary
    folder and loaded back through `from_pretrained(quantization_config=...)`, the public path that quantizes.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    language = getattr(model, group)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        language.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=quant,
            attn_implementation=language.config._attn_implementation,
            device_map={"": torch.cuda.current_device()},
        )
    quantized.requires_grad_(False)
    setattr(model, group, quantized)
    return quantized


# ---- save ---------------------------------------------------------------------------------------------


def split_trained(model: VisionLanguageModel, params: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Trainable tensors (model names, e.g. an engine's gathered fp32 masters) -> (adapters, trained groups).

    Adapters are keyed `<group>.<key>` with PEFT's own state-dict keys (get_peft_model_state_dict); every
    other tensor keeps its model name.
    """
    state = lora_state(model)
    if state is None:
        raise ValueError("the model has no LoRA adapters attached")
    groups = model.module_groups()
    adapters: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    for group in state.tuners:
        prefix = f"{group}."
        mine = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        peft_sd = get_peft_model_state_dict(groups[group], state_dict=mine, adapter_name=ADAPTER_NAME)
        if len(peft_sd) != len(mine):
            raise RuntimeError(
                f"{group}: {len(mine)} trainable tensors but PEFT's adapter state dict has {len(peft_sd)}"
            )
        adapters.update({prefix + k: v.contiguous() for k, v in peft_sd.items()})
        claimed.update(prefix + k for k in mine)
    trained = {k: v.contiguous() for k, v in params.items() if k not in claimed}
    return adapters, trained


def save_lora_output(directory: Path, model: VisionLanguageModel, params: Mapping[str, torch.Tensor]) -> None:
    """Write the adapters, the fully trained groups and `lora.json` into `directory` (each file fsynced)."""
    state = lora_state(model)
    if state is None or state.base is None:
        raise ValueError(
            "a LoRA stage output needs the adapters attached with their base's source (LoraBase)"
        )
    adapters, trained = split_trained(model, params)
    for name, tensors in ((ADAPTERS_NAME, adapters), (TRAINED_NAME, trained)):
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        fsync_file(directory / name)
    base = dataclasses.asdict(state.base)
    if state.base.init_from is not None:
        # Relative first on load: a run directory moved or copied whole still finds its base.
        base["init_from_relative"] = os.path.relpath(state.base.init_from, directory.resolve().parent)
    record = {
        "format": FORMAT,
        "groups": {g: dataclasses.asdict(c) for g, c in sorted(state.groups.items())},
        "base": {**base, "fingerprint": state.fingerprint},
        "adapters": ADAPTERS_NAME,
        "trained": TRAINED_NAME,
    }
    write_text_durably(directory / RECORD_NAME, json.dumps(record, indent=2))


# ---- load ---------------------------------------------------------------------------------------------


def is_lora_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / RECORD_NAME).is_file()


def _base_directory(directory: Path, base: dict[str, Any]) -> Path:
    """The recorded `init_from` folder: relative to the LoRA folder's parent first, then the absolute path."""
    tried = []
    if base.get("init_from_relative"):
        tried.append((directory.resolve().parent / base["init_from_relative"]).resolve())
    tried.append(Path(base["init_from"]))
    for path in tried:
        if (path / CONFIG_NAME).is_file():
            return path
    raise FileNotFoundError(
        f"{directory / RECORD_NAME}: the LoRA checkpoint's base model is missing (looked in "
        f"{', '.join(map(str, tried))}); the adapters are only usable on the base they trained on: restore that "
        "folder there, or export the merged model where the base still exists"
    )


def load_base(directory: Path, record: dict[str, Any], attn_backend: str | None) -> VisionLanguageModel:
    """The frozen base a LoRA output was trained on, built again from its recorded source."""
    base = record["base"]
    if base["init_from"] is not None:
        return VisionLanguageModel.from_pretrained(
            _base_directory(directory, base), attn_backend=attn_backend
        )
    from transformers import AutoTokenizer

    cfg = ModelConfig(**{k: v for k, v in base["model"].items() if k in ModelConfig.__dataclass_fields__})
    if attn_backend is not None:
        cfg = dataclasses.replace(cfg, attn_backend=attn_backend)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base["seed"])  # as vlmtrain.train.run builds a stage's model from `model`
        return VisionLanguageModel.from_config(cfg, tokenizer)


def load_lora_checkpoint(
    directory: str | Path, attn_backend: str | None = None, merge: bool = True
) -> VisionLanguageModel:
    """A LoRA stage output as a model: base rebuilt and checked, adapters and trained groups loaded, merged.

    `merge=False` keeps the adapters attached (PEFT LoRA layers), as training had them.
    """
    from vlmtrain.config.load import STAGE_CONFIG_NAME, stage_config_from_dict
    from vlmtrain.models.freeze import apply_trainability  # freeze attaches adapters through this module

    directory = Path(directory)
    record_path = directory / RECORD_NAME
    record = json.loads(record_path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{record_path}: LoRA record format {record.get('format')!r}, expected {FORMAT}")
    stage_path = directory / STAGE_CONFIG_NAME
    stage = stage_config_from_dict(json.loads(stage_path.read_text()), source=str(stage_path))
    model = load_base(directory, record, attn_backend)
    # QLoRA adapters load onto the unquantized base (the fingerprint is taken before quantizing): merging
    # into 4-bit weights would round the update away, and eval or export may run where bitsandbytes cannot.
    modules = {
        g: dataclasses.replace(m, lora=dataclasses.replace(m.lora, quantize=None))
        if m.lora is not None
        else m
        for g, m in stage.modules.items()
    }
    state = apply_trainability(model, modules, stage.train.seed)
    assert state is not None
    expected = record["base"]["fingerprint"]
    if state.fingerprint != expected:
        source = record["base"]["init_from"] or {
            k: record["base"]["model"].get(k) for k in ("vision", "language", "tokenizer")
        }
        raise LoraBaseMismatch(
            f"{directory}: the base these LoRA adapters trained on has changed: its frozen weights hash to "
            f"{state.fingerprint}, the checkpoint recorded {expected} (base: {source}). Adapters on another "
            "base would silently compute something else; point the stage at the original base again (same "
            "checkpoint directories, same seed), or retrain the adapters on this one"
        )
    _load_adapters(model, state, load_file(str(directory / record["adapters"])), directory)
    _load_trained(model, load_file(str(directory / record["trained"])), directory)
    model.requires_grad_(True)  # as any loaded model: the next stage applies its own trainability
    if merge:
        merge_lora(model)
    return model


def _load_adapters(
    model: VisionLanguageModel, state: LoraState, adapters: dict[str, torch.Tensor], directory: Path
) -> None:
    groups = model.module_groups()
    for group in state.tuners:
        prefix = f"{group}."
        mine = {k[len(prefix) :]: v for k, v in adapters.items() if k.startswith(prefix)}
        wanted = set(get_peft_model_state_dict(groups[group], adapter_name=ADAPTER_NAME))
        if set(mine) != wanted:
            missing, extra = sorted(wanted - set(mine)), sorted(set(mine) - wanted)
            raise ValueError(
                f"{directory / ADAPTERS_NAME}: {group} adapters do not match the recorded LoRA settings: "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        set_peft_model_state_dict(groups[group], mine, adapter_name=ADAPTER_NAME)


def _load_trained(model: VisionLanguageModel, trained: dict[str, torch.Tensor], directory: Path) -> None:
    """The fully trained groups' tensors; every trainable non-adapter parameter must be among them."""
    adapters = {id(p) for p in adapter_parameters(model)}
    named = dict(model.named_parameters())
    needed = {n for n, p in named.items() if p.requires_grad and id(p) not in adapters}
    missing, unexpected = sorted(needed - set(trained)), sorted(set(trained) - needed)
    if missing or unexpected:
        raise ValueError(
            f"{directory / TRAINED_NAME}: trained tensors do not match the stage's trainable groups: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, tensor in trained.items():
            named[name].copy_(tensor)
