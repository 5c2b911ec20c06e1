"""Test entry point: `vlmtrain train` in which every model, tokenizer and weights load ends the process.

    python tests/preflight_entry.py <vlmtrain train arguments>

Each loader prints `LOAD REACHED: <what>` and leaves with LOAD_EXIT_CODE, so a test sees both that the
preflight passed (the command got to its first load) and that a failing preflight read no weights (the
marker is absent). The library itself has no such hook.
"""

from __future__ import annotations

import os
import sys

LOAD_EXIT_CODE = 97
MARKER = "LOAD REACHED"


def _refuse(what: str):
    def refuse(*args, **kwargs):
        print(f"{MARKER}: {what} {args[:1]!r}", file=sys.stderr, flush=True)
        os._exit(LOAD_EXIT_CODE)

    return refuse


def main() -> None:
    import safetensors.torch
    import transformers

    from vlmtrain.models.vlm import VisionLanguageModel
    from vlmtrain.train import run

    for name in ("from_pretrained", "from_config"):
        setattr(VisionLanguageModel, name, classmethod(lambda cls, *a, _n=name, **k: _refuse(_n)(*a)))
    transformers.AutoTokenizer.from_pretrained = _refuse("AutoTokenizer.from_pretrained")  # type: ignore[method-assign]
    transformers.PreTrainedModel.from_pretrained = classmethod(  # type: ignore[method-assign]
        lambda cls, *a, **k: _refuse("PreTrainedModel.from_pretrained")(*a)
    )
    safetensors.torch.load_file = _refuse("safetensors load_file")
    run.load_model_and_tokenizer = _refuse("load_model_and_tokenizer")  # type: ignore[assignment]
    from vlmtrain.cli import app

    app(["train", *sys.argv[1:]], prog_name="preflight_entry.py")


if __name__ == "__main__":
    main()
