"""``fitsim``: the command line (``fitsim estimate | models | gpus | scenario-template``).

Flags override the fields of an optional scenario YAML; the result is validated as a
:class:`~simulator.config.Scenario`, so the CLI accepts exactly what the library accepts.
Exit codes: 0 success (also when the setup does not fit -- that is an answer), 1 with
``--fail-if-no-fit`` when it does not fit, 2 bad input (one line on stderr, never a traceback),
3 an internal error (set ``FITSIM_DEBUG=1`` for its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hwprofiles import UnknownNameError, all_devices

from . import report
from .config import (
    Checkpointing, InferenceQuant, InferWorkload, LoRA, Method, ModelArch, Optimizer, PrefixTuning, QLoRA, Scenario,
    TrainWorkload,
)
from .config.parallel import Parallel
from .config.training import GALORE_BASE
from .plan_cli import add_plan_parser
from .estimate import count_params, estimate
from .models import get_model, list_models

PROG = "fitsim"

METHOD_CLASSES: dict[str, type[BaseModel]] = {
    c.model_fields["kind"].default: c for c in typing.get_args(typing.get_args(Method)[0])
}
"""method kind -> its config class, in the order of the scenario's method union."""

WORKLOAD_CLASSES: dict[str, type[BaseModel]] = {"train": TrainWorkload, "infer": InferWorkload}

# flag dest -> field of the method config
METHOD_FLAGS = ("r", "alpha", "targets", "quant", "use_dora", "fp32_unquantized", "n_virtual_tokens")
TRAIN_FLAGS = ("seq_len", "micro_batch", "grad_accum")
INFER_FLAGS = ("batch", "prompt_len", "gen_len", "prefill_logits")

EXIT_OK, EXIT_NO_FIT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class CliError(Exception):
    """Bad input found by the CLI itself; printed as ``fitsim: error: <field>: <message>``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise CliError("", f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------ error messages


def _strip_prefix(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _clean_loc(loc: Sequence[Any]) -> list[str]:
    """Drop the union tags pydantic puts in error locations (('method', 'lora', 'r') -> method.r)."""
    out: list[str] = []
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        p = parts[i]
        out.append(p)
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if nxt is not None and ((p == "method" and nxt in METHOD_CLASSES) or (p == "workload" and nxt in WORKLOAD_CLASSES)):
            i += 2
            continue
        i += 1
    return [p for p in out if "[" not in p]  # union member names such as list[str], literal['all-linear']


def _fields_at(loc: Sequence[Any]) -> list[str] | None:
    """Field names allowed beside the last element of a raw error location (for 'unknown field' errors)."""
    parts = [str(p) for p in loc]
    head = parts[:-1]
    if not head:
        return list(Scenario.model_fields)
    if head[0] == "method" and len(head) == 2 and head[1] in METHOD_CLASSES:
        return list(METHOD_CLASSES[head[1]].model_fields)
    if head[0] == "workload" and len(head) == 2 and head[1] in WORKLOAD_CLASSES:
        return list(WORKLOAD_CLASSES[head[1]].model_fields)
    simple = {"optimizer": Optimizer, "checkpointing": Checkpointing, "inference": InferenceQuant, "model": ModelArch}
    if len(head) == 1 and head[0] in simple:
        return list(simple[head[0]].model_fields)
    return None


def format_validation_error(err: ValidationError) -> str:
    """Each error as ``loc: msg``, joined by '; ' (one line)."""
    merged: dict[str, list[str]] = {}
    for e in err.errors():
        msg = _strip_prefix(e["msg"])
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(e["loc"])
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        key = ".".join(_clean_loc(e["loc"]))
        merged.setdefault(key, [])
        if msg not in merged[key]:
            merged[key].append(msg)
    items = [f"{k}: {' or '.join(v)}" if k else " or ".join(v) for k, v in merged.items()]
    return "; ".join(items)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------- scenario building


def read_scenario_file(path: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` ('-' = stdin); errors name the file."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(path, "no such file") from None
    except IsADirectoryError:
        raise CliError(path, "is a directory, not a scenario YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(path, f"cannot read: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise CliError(path, f"invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(path, f"a scenario YAML must be a mapping of fields (model, gpu, workload, ...), got {type(data).__name__}")
    return data


def _sub(data: dict[str, Any], key: str) -> dict[str, Any]:
    """A copy of the mapping under ``key`` (empty if absent; left as-is for pydantic to reject if not a mapping)."""
    v = data.get(key)
    return dict(v) if isinstance(v, dict) else {}


def _parse_targets(text: str) -> list[str] | str:
    text = text.strip()
    if text == "all-linear":
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def build_scenario_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The scenario file's mapping with the flags written over it (not yet validated)."""
    data = read_scenario_file(args.scenario) if args.scenario else {}

    if args.model is not None:
        data["model"] = args.model
    if "model" not in data:
        raise CliError("model", "required: give --model NAME or a scenario file with 'model:' (see `fitsim models`)")
    if args.gpu is not None:
        data["gpu"] = args.gpu

    # workload: the task comes from --task, else the file, else the flags used
    wl = _sub(data, "workload") if "workload" in data else {}
    given_train = [f for f in TRAIN_FLAGS if getattr(args, f) is not None]
    given_infer = [f for f in INFER_FLAGS if getattr(args, f) is not None]
    infer_hint = bool(given_infer) or any(getattr(args, f) is not None for f in INFERENCE_FLAGS)
    file_task = wl.get("task") or ("infer" if any(k in wl for k in INFER_FLAGS) else "train" if wl else None)
    task = args.task or file_task or ("infer" if infer_hint and not given_train else "train")
    if args.task and file_task and args.task != file_task and args.task in WORKLOAD_CLASSES:
        fields = WORKLOAD_CLASSES[args.task].model_fields
        wl = {k: v for k, v in wl.items() if k in fields}  # switching task drops the other task's knobs
    wl["task"] = task
    for f in (*TRAIN_FLAGS, *INFER_FLAGS):
        v = getattr(args, f)
        if v is not None:
            wl[f] = v
    if isinstance(data.get("workload"), (dict, type(None))):
        data["workload"] = wl

    # method: --method KIND, else the file's, else implied by the method flags (--quant -> qlora, --r/--alpha/--targets -> lora)
    given_m = {f: getattr(args, f) for f in METHOD_FLAGS if getattr(args, f) is not None}
    if "targets" in given_m:
        given_m["targets"] = _parse_targets(given_m["targets"])
    if args.method is not None or given_m:
        md = _sub(data, "method")
        kind = args.method or md.get("kind")
        if args.method is None and "quant" in given_m and kind in (None, "lora"):
            kind = "qlora"  # --quant turns (the file's) LoRA into QLoRA with the same adapter settings
        if kind is None:
            kind = "lora" if given_m.keys() & {"r", "alpha", "targets"} else "full"
        cls = METHOD_CLASSES.get(kind)
        if cls is not None:
            if md.get("kind", "full") != kind:
                md = {k: v for k, v in md.items() if k in cls.model_fields}  # switching method drops the old one's knobs
            for f in given_m:
                if f not in cls.model_fields:
                    users = [k for k, c in METHOD_CLASSES.items() if f in c.model_fields]
                    raise CliError(f"method.{f}", f"method '{kind}' has no field '{f}' (used by: {', '.join(users)})")
        md["kind"] = kind
        md.update(given_m)
        data["method"] = md

    for flag in ("precision", "attention", "loss", "implementation"):
        v = getattr(args, flag)
        if v is not None:
            data[flag] = v
    if args.expandable_segments:
        data["expandable_segments"] = True
    if args.host_sync_per_block:
        data["host_sync_per_block"] = True
    if args.padded_batches:
        data["padded_batches"] = True
    if args.compile:
        data["compile"] = True
    if args.optimizer is not None:
        data["optimizer"] = {**_sub(data, "optimizer"), "name": args.optimizer}
    if args.galore_rank is not None:
        opt = _sub(data, "optimizer")
        if opt.get("name") not in GALORE_BASE:
            raise CliError("optimizer.galore_rank", "--galore-rank needs a GaLore optimizer: --optimizer "
                           + " | ".join(GALORE_BASE))
        data["optimizer"] = {**opt, "galore_rank": args.galore_rank}
    if args.checkpointing is not None or args.every_k is not None or args.reentrant:
        ck = _sub(data, "checkpointing")
        if args.checkpointing is not None:
            ck["mode"] = args.checkpointing
        if args.every_k is not None:
            ck["every_k"] = args.every_k
            ck.setdefault("mode", "every_k")
        if args.reentrant:
            ck["reentrant"] = True
        data["checkpointing"] = ck
    _apply_parallel_flags(args, data)
    if any(getattr(args, f) is not None for f in INFERENCE_FLAGS):
        inf = _sub(data, "inference")
        for f in INFERENCE_FLAGS:
            if getattr(args, f) is not None:
                inf[f] = getattr(args, f)
        data["inference"] = inf
    return data


INFERENCE_FLAGS = ("weights", "kv_dtype", "engine", "gpu_memory_utilization", "max_num_seqs", "cuda_graphs")


PARALLEL_FLAGS = ("tp", "pp", "cp", "ep", "zero", "fsdp", "pp_schedule", "pp_virtual")


def _apply_parallel_flags(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """--gpus N, --tp/--pp/--cp/--ep, --zero, --fsdp, --offload: the data-parallel degree is what is left
    of the GPU count once tp x pp x cp are taken."""
    if args.system is not None:
        data["system"] = args.system
    if args.total_tokens is not None:
        wl = _sub(data, "workload")
        wl["total_tokens"] = args.total_tokens
        data["workload"] = wl
    given = {f: getattr(args, f) for f in PARALLEL_FLAGS if getattr(args, f) is not None}
    if args.sp:
        given["sp"] = True
    if args.offload is not None:
        parts = {x.strip() for x in args.offload.split(",") if x.strip()}
        allowed = {"optimizer", "params", "optimizer-nvme", "params-nvme", "none"}
        bad = sorted(parts - allowed)
        if bad:
            raise CliError("--offload", f"unknown {bad}; allowed: comma-separated {', '.join(sorted(allowed))}")
        given["offload_optimizer"] = "nvme" if "optimizer-nvme" in parts else ("cpu" if "optimizer" in parts else "none")
        given["offload_params"] = "nvme" if "params-nvme" in parts else ("cpu" if "params" in parts else "none")
    if args.gpus is None and not given:
        return
    par = {**_sub(data, "parallel"), **given}
    if args.gpus is not None:
        inner = par.get("tp", 1) * par.get("pp", 1) * par.get("cp", 1)
        if args.gpus < 1 or args.gpus % inner:
            raise CliError("--gpus", f"--gpus {args.gpus} is not a multiple of tp x pp x cp = {inner}")
        par["dp"] = args.gpus // inner
    data["parallel"] = par


def build_scenario(args: argparse.Namespace) -> Scenario:
    return Scenario.model_validate(build_scenario_dict(args))


# ------------------------------------------------------------------------------------------ commands


def cmd_estimate(args: argparse.Namespace) -> int:
    sc = build_scenario(args)
    e = estimate(sc)
    if args.json:
        out = {**e.model_dump(mode="json"), "scenario": sc.model_dump(mode="json")}
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write(report.render(e, sc))
    return EXIT_NO_FIT if (args.fail_if_no_fit and not e.fits) else EXIT_OK


def model_rows() -> list[dict[str, Any]]:
    """One dict per catalog model: name, family, shape and parameter count (None if it cannot be counted)."""
    rows = []
    for name in list_models():
        a = get_model(name)
        try:
            params: int | None = count_params(a)
        except Exception:  # a count is a nicety here; the listing must not fail because of one model
            params = None
        rows.append(dict(name=a.name, family=a.family, arch=a.arch, params=params, n_layers=a.n_layers,
                         hidden=a.hidden, n_heads=a.n_heads, n_kv_heads=a.kv_heads, intermediate=a.intermediate,
                         vocab=a.vocab, max_position_embeddings=a.max_position_embeddings, moe=a.moe is not None,
                         hf_id=a.hf_id, source=a.source))
    return rows


def gpu_rows() -> list[dict[str, Any]]:
    """One dict per device profile: memory, bf16 peak, bandwidth, price."""
    return [dict(name=d.name, display_name=d.display_name, vendor=d.vendor, architecture=d.architecture,
                 memory_total_bytes=d.memory_total_bytes, memory_capacity_GB=d.memory_capacity_GB,
                 bf16_tflops=d.peak_tflops.bf16, fp16_tflops=d.peak_tflops.fp16, fp8_tflops=d.peak_tflops.fp8,
                 hbm_bandwidth_GBps=d.hbm_bandwidth_GBps, price_usd_per_hour=d.price_usd_per_hour,
                 price_date=d.price_date) for d in all_devices()]


def system_rows() -> list[dict[str, Any]]:
    """One dict per system profile: GPUs per node, fabrics, price."""
    from hwprofiles import all_systems

    return [dict(name=x.name, display_name=x.display_name, device=x.device, gpus_per_node=x.gpus_per_node,
                 intra_node=x.intra_node.kind, intra_node_GBps=x.intra_node.bandwidth_GBps,
                 inter_node=None if x.inter_node is None else x.inter_node.technology,
                 nics_per_node=None if x.inter_node is None else x.inter_node.nics_per_node,
                 price_usd_per_gpu_hour=x.price_usd_per_gpu_hour) for x in all_systems()]


def _listing(rows: list[dict[str, Any]], table, as_json: bool) -> int:
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        sys.stdout.write(table(rows))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    return _listing(model_rows(), report.models_table, args.json)


def cmd_gpus(args: argparse.Namespace) -> int:
    return _listing(gpu_rows(), report.gpus_table, args.json)


def cmd_systems(args: argparse.Namespace) -> int:
    return _listing(system_rows(), report.systems_table, args.json)


SCENARIO_TEMPLATE = """\
# fitsim scenario: `fitsim estimate this.yaml` (flags such as --seq-len override these fields).
# Every field except `model` has a default; `fitsim models` / `fitsim gpus` list the names.
model: llama-3.1-8b          # catalog name or Hugging Face id; or a mapping of architecture fields
gpu: h100-sxm-80gb           # device profile name

workload:
  task: train                # train | infer
  micro_batch: 4             # sequences per forward/backward
  seq_len: 2048              # tokens per sequence (padded)
  grad_accum: 1              # micro-batches per optimizer step
  # for serving instead:  task: infer, batch: 8, prompt_len: 512, gen_len: 256

method:
  kind: qlora                # full | freeze | lora | dora | qlora | ia3 | prefix | prompt | bitfit | adapter | llama-adapter | shira
  quant: nf4                 # qlora base storage: nf4 | fp4 | int8 | gptq | awq
  fp32_unquantized: none     # qlora on bitsandbytes: all (PEFT prepare_model_for_kbit_training) | norms (TRL bf16) | none
  r: 16                      # LoRA rank
  alpha: 32                  # scaling = alpha / r
  targets: all-linear        # or a list: [q_proj, v_proj]

precision: bf16              # fp32 | bf16-amp | fp16-amp | bf16 | fp16 | fp8
optimizer:
  name: adamw                # adamw | adam | sgd | sgd-momentum | adafactor | lion | adamw-8bit | paged-adamw-8bit | paged-adamw-32bit
                             # | galore-adamw | galore-adamw-8bit | galore-adafactor (method full or freeze, data parallel only)
  impl: foreach              # foreach | foreach-torch2.0 | fused | for-loop
  in_backward: false         # step each parameter during backward (layer-wise GaLore, torchtune optimizer_in_bwd)
  galore_rank: 128           # galore-* only: projection rank; also galore_update_proj_gap, galore_scale,
  galore_proj_type: std      #   galore_proj_type (std | reverse_std | left | right | full),
  galore_targets: [attn, mlp]  # galore_targets (substrings or regexes of nn.Linear module paths)
checkpointing:
  mode: full                 # none | full | every_k | offload | selective
  every_k: 1                 # with mode every_k: checkpoint one block in k
  reentrant: false           # true: the backward reruns each block's whole forward (transformers 4, DeepSpeed, Megatron)
attention: sdpa-flash        # eager | sdpa-math | sdpa-mem-efficient | sdpa-flash | flash1 | flash2 | flash3
loss: upcast                 # upcast (HF fp32 logits) | upcast-shift | chunked | chunked-compiled (torchtune) | fused (Liger)
inference:                   # task infer only
  weights: none              # none | int8 | nf4 | fp4 | gptq | awq | fp8
  kv_dtype: auto             # auto | bf16 | fp16 | fp32 | fp8 | int8
  engine: transformers       # transformers (generate) | vllm (KV pool up front, CUDA-graph decode)
  gpu_memory_utilization: 0.9  # engine vllm: the device share its pool fills
  max_num_seqs: 256          # engine vllm: the most sequences decoded at once
  cuda_graphs: null          # decode steps replay CUDA graphs (null: on for vllm, off for transformers)
compile: false               # torch.compile: pointwise ops fused between matmul / attention kernels
expandable_segments: false   # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
host_sync_per_block: false   # the model's code syncs host and GPU in every block (2022's GPT-J)
"""


def cmd_app(args: argparse.Namespace) -> int:
    """Run the dashboard in its own process (``python -m app.cli``): the engine never imports ``app``."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "app.cli", *getattr(args, "rest", [])])


def cmd_template(args: argparse.Namespace) -> int:
    sys.stdout.write(SCENARIO_TEMPLATE)
    return EXIT_OK


# -------------------------------------------------------------------------------------------- parser


def _choices(model: type[BaseModel], field: str) -> list[str]:
    """Allowed values of a Literal field (empty if it is not one)."""
    def walk(t: Any) -> list[str]:
        if typing.get_origin(t) is typing.Literal:
            return [str(a) for a in typing.get_args(t)]
        return [x for a in typing.get_args(t) for x in walk(a)]
    return walk(model.model_fields[field].annotation)


def _doc(model: type[BaseModel], field: str, choices: bool = True) -> str:
    """The field's attribute docstring (the one text for CLI help and dashboard tooltips) plus its choices."""
    text = (model.model_fields[field].description or "").replace("%", "%%")
    allowed = _choices(model, field) if choices else []
    return text + (f" [{' | '.join(allowed)}]" if allowed else "")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog=PROG, description="Will this fine-tuning or serving setup fit on this GPU? "
                        "Analytical memory, time and cost estimates.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("estimate", help="estimate memory, FLOPs, time and cost of one setup",
                       description="Estimate one setup. Flags override the fields of SCENARIO.yaml.")
    e.add_argument("scenario", nargs="?", metavar="SCENARIO.yaml", help="scenario file ('-' = stdin); see `fitsim scenario-template`")
    g = e.add_argument_group("what and where")
    g.add_argument("--model", metavar="M", help=_doc(Scenario, "model"))
    g.add_argument("--gpu", metavar="G", help=_doc(Scenario, "gpu"))
    g = e.add_argument_group("workload")
    g.add_argument("--task", metavar="train|infer", help="training step or generation (default: from the file, "
                   "else infer when only inference flags are given, else train)")
    g.add_argument("--seq-len", type=int, metavar="N", help=_doc(TrainWorkload, "seq_len"))
    g.add_argument("--micro-batch", type=int, metavar="N", help=_doc(TrainWorkload, "micro_batch"))
    g.add_argument("--grad-accum", type=int, metavar="N", help=_doc(TrainWorkload, "grad_accum"))
    g.add_argument("--batch", type=int, metavar="N", help=_doc(InferWorkload, "batch"))
    g.add_argument("--prompt-len", type=int, metavar="N", help=_doc(InferWorkload, "prompt_len"))
    g.add_argument("--gen-len", type=int, metavar="N", help=_doc(InferWorkload, "gen_len"))
    g.add_argument("--prefill-logits", metavar="last|all", help=_doc(InferWorkload, "prefill_logits"))
    g = e.add_argument_group("method")
    g.add_argument("--method", metavar="KIND", help="fine-tuning method [" + " | ".join(METHOD_CLASSES) + "]; "
                   "--quant implies qlora (also over a file's lora), --r/--alpha/--targets imply lora")
    g.add_argument("--r", type=int, metavar="R", help=_doc(LoRA, "r"))
    g.add_argument("--alpha", type=float, metavar="A", help=_doc(LoRA, "alpha"))
    g.add_argument("--targets", metavar="q_proj,v_proj|all-linear", help="comma-separated module names, or all-linear")
    g.add_argument("--quant", metavar="Q", help=_doc(QLoRA, "quant"))
    g.add_argument("--use-dora", action="store_true", default=None, help=_doc(QLoRA, "use_dora"))
    g.add_argument("--fp32-unquantized", metavar="none|norms|all", help=_doc(QLoRA, "fp32_unquantized", choices=False))
    g.add_argument("--n-virtual-tokens", type=int, metavar="N", help=_doc(PrefixTuning, "n_virtual_tokens") + " (prefix, prompt)")
    g = e.add_argument_group("numerics and runtime")
    g.add_argument("--precision", metavar="P", help=_doc(Scenario, "precision", choices=False)
                   + " [" + " | ".join(_choices(Scenario, "precision")) + "]")
    g.add_argument("--optimizer", metavar="O", help=_doc(Optimizer, "name"))
    g.add_argument("--galore-rank", type=int, metavar="R", help="GaLore projection rank (with a galore-* optimizer)")
    g.add_argument("--checkpointing", metavar="none|full|every_k|offload|selective", help=_doc(Checkpointing, "mode", choices=False))
    g.add_argument("--every-k", type=int, metavar="K", help=_doc(Checkpointing, "every_k") + " (implies --checkpointing every_k)")
    g.add_argument("--reentrant", action="store_true", help=_doc(Checkpointing, "reentrant"))
    g.add_argument("--attention", metavar="A", help=_doc(Scenario, "attention", choices=False)
                   + " [" + " | ".join(_choices(Scenario, "attention")) + "]")
    g.add_argument("--loss", metavar="upcast|upcast-shift|chunked|chunked-compiled|fused", help=_doc(Scenario, "loss", choices=False))
    g.add_argument("--implementation", metavar="transformers|litgpt|torchtune", help=_doc(Scenario, "implementation", choices=False))
    g.add_argument("--padded-batches", action="store_true", help=_doc(Scenario, "padded_batches"))
    g.add_argument("--compile", action="store_true", help=_doc(Scenario, "compile"))
    g.add_argument("--weights", metavar="W", help=_doc(InferenceQuant, "weights") + " (implies --task infer)")
    g.add_argument("--kv-dtype", metavar="D", help=_doc(InferenceQuant, "kv_dtype") + " (implies --task infer)")
    g.add_argument("--engine", metavar="transformers|vllm", help=_doc(InferenceQuant, "engine", choices=False)
                   + " (implies --task infer)")
    g.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help=_doc(InferenceQuant, "gpu_memory_utilization") + " (implies --task infer)")
    g.add_argument("--max-num-seqs", type=int, metavar="N", help=_doc(InferenceQuant, "max_num_seqs")
                   + " (implies --task infer)")
    g.add_argument("--cuda-graphs", action="store_const", const=True, default=None,
                   help=_doc(InferenceQuant, "cuda_graphs") + " (implies --task infer)")
    g.add_argument("--expandable-segments", action="store_true", help=_doc(Scenario, "expandable_segments"))
    g.add_argument("--host-sync-per-block", action="store_true", help=_doc(Scenario, "host_sync_per_block"))
    g = e.add_argument_group("parallelism, hardware and cost")
    g.add_argument("--gpus", type=int, metavar="N", help="GPUs in all; data parallel = N / (tp x pp x cp)")
    g.add_argument("--system", metavar="S", help=_doc(Scenario, "system"))
    g.add_argument("--tp", type=int, metavar="N", help=_doc(Parallel, "tp"))
    g.add_argument("--pp", type=int, metavar="N", help=_doc(Parallel, "pp"))
    g.add_argument("--cp", type=int, metavar="N", help=_doc(Parallel, "cp"))
    g.add_argument("--ep", type=int, metavar="N", help=_doc(Parallel, "ep"))
    g.add_argument("--sp", action="store_true", help=_doc(Parallel, "sp"))
    g.add_argument("--zero", type=int, metavar="0-3", help=_doc(Parallel, "zero", choices=False))
    g.add_argument("--fsdp", metavar="MODE", help=_doc(Parallel, "fsdp"))
    g.add_argument("--pp-schedule", metavar="S", help=_doc(Parallel, "pp_schedule"))
    g.add_argument("--pp-virtual", type=int, metavar="V", help=_doc(Parallel, "pp_virtual"))
    g.add_argument("--offload", metavar="optimizer,params", help="offload to host RAM: optimizer, params; to NVMe: optimizer-nvme, params-nvme")
    g.add_argument("--total-tokens", type=float, metavar="N", help=_doc(TrainWorkload, "total_tokens"))
    g = e.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the Estimate as JSON (with the validated scenario under 'scenario')")
    g.add_argument("--fail-if-no-fit", action="store_true", help="exit 1 when the setup does not fit (default: 0, it is an answer)")
    e.set_defaults(func=cmd_estimate)

    m = sub.add_parser("models", help="list the model catalog", description="List the named architectures.")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)

    gp = sub.add_parser("gpus", help="list the device profiles", description="List the GPU profiles (dense peaks).")
    gp.add_argument("--json", action="store_true", help="print JSON")
    gp.set_defaults(func=cmd_gpus)

    add_plan_parser(sub)

    sy = sub.add_parser("systems", help="list the node types", description="List the system (node) profiles.")
    sy.add_argument("--json", action="store_true", help="print JSON")
    sy.set_defaults(func=cmd_systems)

    a = sub.add_parser("app", help="start the what-if dashboard (needs the 'app' extra)", add_help=False,
                       description="Start the Streamlit dashboard on localhost; further arguments go to streamlit.")
    a.set_defaults(func=cmd_app)

    t = sub.add_parser("scenario-template", help="print a commented example scenario YAML",
                       description="Print a commented example scenario (valid as is).")
    t.set_defaults(func=cmd_template)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fitsim")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------- main


def _fail(message: str) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fitsim`` and ``python -m simulator``; returns the exit code."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(list(argv) if argv is not None else None)
        if rest and getattr(args, "func", None) is not cmd_app:
            parser.parse_args(list(argv) if argv is not None else None)  # the usual error for unknown arguments
        args.rest = rest
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args))
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except CliError as err:
        return _fail(str(err))
    except ValidationError as err:  # before ValueError: pydantic's ValidationError is one
        return _fail(format_validation_error(err))
    except (UnknownNameError, ValueError) as err:
        return _fail(str(err))
    except BrokenPipeError:  # `fitsim models | head`: stop quietly (no "Exception ignored" at exit)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # an engine bug: one line unless asked for the traceback
        if os.environ.get("FITSIM_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(err).__name__}: {_one_line(str(err))} "
              "(set FITSIM_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
