"""The lmms-eval side of `vlmtrain eval lmms`: runs INSIDE lmms-eval's own environment, never in vlmtrain's.

lmms-eval 0.7.3 pins wandb==0.25.0 (vlmtrain ships 0.31) and needs torchvision and opencv, so it lives in a
virtual environment of its own (`vlmtrain.eval.lmms_env`). This script is started there as
`python -I lmms_client.py` (arguments as JSON in $VLMTRAIN_LMMS_ARGS) (isolated: no vlmtrain, no script-directory imports) by
`vlmtrain.eval.lmms`, which holds the model. It registers the `vlmtrain` model class with lmms-eval's model
registry (`ModelRegistryV2.register_manifest`) and runs lmms-eval's own single-run entry point, which writes its
own result files. The model class does no modelling: it sends each batch of requests (question text, image as
PNG bytes, max_new_tokens) over a pipe to the vlmtrain process, which answers with the trained model exactly as
`vlmtrain ask` does (one prompt path: vlmtrain.data.prompt), and truncates answers at the task's `until`
strings as every lmms-eval model does.

Wire format (pickles of plain dicts/lists/bytes over multiprocessing.connection on two inherited pipe fds):
client -> server {"kind": "generate", "items": [{"text", "image", "max_new_tokens"}]} -> list[str];
client -> server {"kind": "done", "results": JSON string} | {"kind": "error", "message": str}, then exits.
Imports only the standard library, PIL and lmms_eval.
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

ENV_FDS = "VLMTRAIN_LMMS_FDS"  # "read_fd,write_fd" of the pipes to the vlmtrain process
ENV_ARGS = "VLMTRAIN_LMMS_ARGS"  # JSON: tasks, limit, batch_size, output_path, include_path, prefetch
MODEL_ID = "vlmtrain"
# Exceptions (by class name, anywhere in the cause chain) that mean a dataset could not be downloaded.
_OFFLINE_ERRORS = (
    "ConnectionError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "DatasetNotFoundError",
    "HfHubHTTPError",
    "MaxRetryError",
    "NameResolutionError",
    "ConnectTimeout",
)


def _connection() -> tuple[Connection, Connection]:
    fds = os.environ.get(ENV_FDS)
    if not fds:
        raise SystemExit(f"{ENV_FDS} is not set: this script is started by `vlmtrain eval lmms`, not by hand")
    read_fd, write_fd = (int(x) for x in fds.split(","))
    return Connection(read_fd, writable=False), Connection(write_fd, readable=False)


_CONN: tuple[Connection, Connection] | None = None


def _request(message: dict[str, Any]) -> Any:
    global _CONN
    if _CONN is None:
        _CONN = _connection()
    recv, send = _CONN
    send.send(message)
    return recv.recv()


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server sees the task's pixels
    return buf.getvalue()


def _truncate(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _model_class() -> type:
    from lmms_eval.api.model import lmms
    from PIL import Image

    class VlmtrainServed(lmms):
        """lmms-eval model whose answers come from the vlmtrain process that started this one."""

        def __init__(self, batch_size: int | str = 8, **_: Any) -> None:
            super().__init__()
            self.batch_size_per_gpu = int(batch_size)
            self.warned_sampling = False

        def _item(self, request: Any) -> tuple[dict[str, Any], list[str]]:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = [v for v in (visuals or []) if v is not None]
            if any(not isinstance(v, Image.Image) for v in visuals):
                raise ValueError(f"task {task} doc {doc_id}: vlmtrain models read images, not video or audio")
            if len(visuals) > 1:
                raise ValueError(
                    f"task {task} doc {doc_id} has {len(visuals)} images; vlmtrain models read one per "
                    "question (pick single-image tasks)"
                )
            kwargs = dict(gen_kwargs or {})
            if (
                kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0
            ) and not self.warned_sampling:
                print(f"vlmtrain: task {task} asks for sampling; vlmtrain answers greedily", file=sys.stderr)
                self.warned_sampling = True
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            item = {
                "text": context,
                "image": _png(visuals[0]) if visuals else None,
                "max_new_tokens": int(kwargs.get("max_new_tokens") or 64),
            }
            return item, until

        def generate_until(self, requests: list[Any]) -> list[str]:
            out: list[str] = []
            size = self.batch_size_per_gpu
            for start in range(0, len(requests), size):
                items, untils = zip(*(self._item(r) for r in requests[start : start + size]), strict=True)
                answers = _request({"kind": "generate", "items": list(items)})
                out += [_truncate(a, u) for a, u in zip(answers, untils, strict=True)]
            return out

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            raise NotImplementedError(
                "vlmtrain serves generate_until tasks only; this task scores by loglikelihood "
                f"({requests[0].task_name if requests else '?'}): pick its generation variant"
            )

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise NotImplementedError("vlmtrain serves single-round generate_until tasks only")

    return VlmtrainServed


def _datasets_of(task_manager: Any, tasks: list[str]) -> dict[str, str]:
    """task -> `dataset_path[/dataset_name]` of the named tasks lmms-eval knows (groups are left out)."""
    out = {}
    for name in tasks:
        try:
            cfg = task_manager._get_config(name)
        except Exception:  # a group or an unknown name: lmms-eval reports unknown names itself
            continue
        if isinstance(cfg, dict) and cfg.get("dataset_path"):
            out[name] = str(cfg["dataset_path"]) + (
                f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""
            )
    return out


def _is_offline_error(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if type(seen).__name__ in _OFFLINE_ERRORS or "Couldn't reach" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _offline_message(err: BaseException, datasets: dict[str, str], tasks: list[str]) -> str:
    named = "; ".join(f"task {t} reads {d}" for t, d in datasets.items()) or f"tasks {','.join(tasks)}"
    return (
        f"a dataset could not be downloaded ({type(err).__name__}: {err}); {named}. It is neither local nor in "
        f"the Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, "
        f"HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE', '0')}). Pre-fetch it where the Hub is "
        f"reachable: `vlmtrain eval lmms --prefetch --tasks {','.join(tasks)}` (it fills the same cache; copy "
        "that folder here if this machine is offline), then run again"
    )


def main(args: dict[str, Any]) -> int:
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    from lmms_eval.tasks import TaskManager

    MODEL_REGISTRY_V2.register_manifest(
        ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VlmtrainServed"), overwrite=True
    )
    tasks = list(args["tasks"])
    include = args.get("include_path")
    if args.get("prefetch"):
        from lmms_eval.tasks import get_task_dict

        get_task_dict(tasks, TaskManager("WARNING", include_path=include))  # downloads each task's dataset
        print(f"vlmtrain: datasets of {','.join(tasks)} are in the Hugging Face cache")
        return 0
    _, ns = parse_eval_args()  # lmms-eval's own defaults for every option not set here
    ns.model = MODEL_ID
    ns.model_args = ""
    ns.tasks = ",".join(tasks)
    ns.include_path = include
    ns.limit = args.get("limit")
    ns.batch_size = args.get("batch_size", 8)
    ns.output_path = args["output_path"]
    ns.log_samples = True
    ns.verbosity = "WARNING"
    ns.device = "cpu"  # the model runs in the vlmtrain process; nothing here touches an accelerator
    try:
        results, _ = cli_evaluate_single(ns)
    except Exception as err:
        if _is_offline_error(err):
            # Local tasks first: indexing lmms-eval's ~2,000 shipped YAMLs takes seconds.
            local = TaskManager("ERROR", include_path=include, include_defaults=False) if include else None
            found = _datasets_of(local, tasks) if local else {}
            if len(found) < len(tasks):
                found = _datasets_of(TaskManager("ERROR", include_path=include), tasks)
            message = _offline_message(err, found, tasks)
        else:
            message = f"lmms-eval failed: {type(err).__name__}: {err}\n{traceback.format_exc()}"
        _request({"kind": "error", "message": message})
        return 1
    if results is None:
        _request({"kind": "error", "message": "lmms-eval returned no results"})
        return 1
    keep = {k: results[k] for k in ("results", "configs", "n-samples", "higher_is_better") if k in results}
    _request({"kind": "done", "results": json.dumps(keep, default=str)})
    return 0


VlmtrainServed: type | None = None

if __name__ == "__main__":
    sys.argv = sys.argv[:1]  # lmms-eval's argument parser must not see ours
    VlmtrainServed = _model_class()
    raise SystemExit(main(json.loads(os.environ[ENV_ARGS])))
