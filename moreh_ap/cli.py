# The `moreh-ap` command line: `moreh-ap plan` plans a model it builds on the meta device.
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from moreh_ap._version import __version__
from moreh_ap.ap_options import APOptions
from moreh_ap.env import read_env
from moreh_ap.errors import NoFeasibleConfigError
from moreh_ap.graph import trace
from moreh_ap.config import ParallelConfig
from moreh_ap.planner.calibration_file import load_calibration_file
from moreh_ap.planner.cluster import PRESETS, Cluster
from moreh_ap.planner.planning import candidate_table, evaluate_config, plan_graph
from moreh_ap.planner.tp import tp_facts

# name -> (family, config keywords); built on the meta device, never downloaded.
MODELS = {
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)),
    "llama2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "gpt2": ("gpt2", dict()),
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``64GiB``, ``80GB``, ``68702699520``; ``argparse`` type."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"--device-memory {text!r} is not valid: expected e.g. 64GiB, 80GB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def _tri(text: str):
    v = str(text).lower()
    if v in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[v]
    raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected auto, true or false")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected an integer >= 1")
    return v


def _tp_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected 'auto' or a power of two >= 1") from None


def _add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a model (built on the meta device) for a cluster and print the candidates",
        description="Trace a model on the meta device, evaluate every parallel configuration and print the "
        "candidate table (stdout) and the seed's log lines (stderr). Exit 0 on a pick, 2 when nothing fits.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help=f"one of {', '.join(MODELS)}, or a path to an HF config.json")
    src.add_argument("--hf-config", metavar="JSON", help="a Hugging Face config as a JSON object (inline, or a path "
                     "to a file holding one), with model_type, e.g. '{\"model_type\": \"llama\", \"hidden_size\": 2048, ...}'")
    p.add_argument("--batch-size", type=_positive, required=True, help="global batch (samples per step)")
    p.add_argument("--seq-len", type=_positive, required=True, help="tokens per sample")
    p.add_argument("--nodes", type=_positive, default=1)
    p.add_argument("--devices-per-node", type=_positive, default=1)
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--preset", choices=PRESETS, help="device type")
    dev.add_argument("--device-memory", type=parse_size, help="bytes per device, e.g. 64GiB (with --peak-tflops)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak TFLOP/s per device (custom device; fp32 = 1/8 of it)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd", "lamb"))
    p.add_argument("--num-stages", type=_positive, help="maximum pipeline stages")
    p.add_argument("--num-micro-batches", type=_positive)
    p.add_argument("--activation-recomputation", type=_tri, default="auto", metavar="{auto,true,false}")
    p.add_argument("--distribute-parameter", type=_tri, default="auto", metavar="{auto,true,false}")
    p.add_argument("--no-pipeline", action="store_true", help="one stage (no pipeline parallelism)")
    p.add_argument("--no-mixed-precision", action="store_true", help="fp32 compute")
    p.add_argument("--tensor-parallel", type=_tp_arg, default="auto", metavar="{auto,1,2,4,8,...}",
                   help="maximum tensor-parallel degree (a power of two; 1 = no tensor parallelism), default auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--calibration", metavar="PATH", help="timings from this file instead of this machine: a "
                   "calibration DB written by moreh_ap or a hardware profile (docs/calibration.md); device memory "
                   "still comes from --preset / --device-memory")
    p.add_argument("--config", metavar="LINE", help="evaluate this one configuration (the one-line form, e.g. "
                   "'num_stages : 1, num_micro_batches : 2, batch_per_device : 4, No TP, recomputation : 0, "
                   "distribute_param : false, distribute_low_prec_param : false') and print its predicted step "
                   "time and memory as one JSON object instead of planning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moreh-ap",
        description="moreh_ap: automatic parallelization for PyTorch training scripts.",
    )
    parser.add_argument("--version", action="version", version=f"moreh-ap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan_parser(sub)
    return parser


def _hf_config_dict(text: str) -> dict:
    """``--hf-config``: a JSON object inline or in a file."""
    raw = text.strip()
    try:
        data = json.loads(raw if raw.startswith("{") else Path(raw).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--hf-config {text[:60]!r} is not valid: expected a JSON object or a path to one ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"--hf-config {text[:60]!r} is not valid: expected a JSON object with a 'model_type'")
    return data


def build_meta_model(name: str | None, *, seq_len: int, hf_config: dict | None = None):
    """An HF causal LM on the meta device: a known name, a path to a ``config.json``, or a config dict.

    Raises:
        ValueError: unknown name / unreadable file / sequence longer than the model allows.
    """
    import transformers  # optional (the "hf" extra): needed only to build a model by name

    if hf_config is not None:
        data = {k: v for k, v in hf_config.items() if k != "architectures"}
        try:
            cfg = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        except Exception as exc:
            raise ValueError(f"--hf-config: not a Hugging Face config: {exc}") from None
    elif name in MODELS:
        family, kw = MODELS[name]
        if family == "llama":
            cfg = transformers.LlamaConfig(**kw, max_position_embeddings=max(4096, seq_len))
        else:
            cfg = transformers.GPT2Config(**kw)
    else:
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--model {name!r} is not valid: expected one of {', '.join(MODELS)} or a path to a config.json")
        try:
            data = json.loads(path.read_text())
            model_type = data.pop("model_type")
            cfg = transformers.AutoConfig.for_model(model_type, **data)
        except Exception as exc:
            raise ValueError(f"--model {name!r}: cannot read a Hugging Face config from {path}: {exc}") from None
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    cfg.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model


def _cluster(args):
    cluster = _device_cluster(args)
    if args.calibration:
        cluster.calibration = load_calibration_file(args.calibration)
    return cluster


def _device_cluster(args):
    if args.preset:
        return Cluster.preset(args.preset, nodes=args.nodes, devices_per_node=args.devices_per_node)
    if not args.peak_tflops or args.peak_tflops <= 0:
        raise ValueError("--device-memory needs --peak-tflops X (bf16 peak TFLOP/s per device, > 0)")
    return Cluster(
        nodes=args.nodes,
        devices_per_node=args.devices_per_node,
        device_memory=args.device_memory,
        peak_flops={"bf16": args.peak_tflops * 1e12, "fp32": args.peak_tflops * 1e12 / 8},
        mem_bandwidth=2e12,
        intra_node_bandwidth=100e9,
        inter_node_bandwidth=25e9,
        name="custom",
    )


def run_plan(args) -> int:
    """``moreh-ap plan``: returns the exit status (0 pick, 2 nothing fits)."""

    try:
        cluster = _cluster(args)
        options = APOptions(
            pipeline_parallel=not args.no_pipeline,
            num_stages=args.num_stages or "auto",
            num_micro_batches=args.num_micro_batches or "auto",
            activation_recomputation=args.activation_recomputation,
            distribute_parameter=args.distribute_parameter,
            mixed_precision=not args.no_mixed_precision,
            tensor_parallel=args.tensor_parallel,
        )
        hf = _hf_config_dict(args.hf_config) if args.hf_config else None
        model = build_meta_model(args.model, seq_len=args.seq_len, hf_config=hf)
        config = None
        if args.config:
            config = ParallelConfig.from_moreh_line(args.config).replace(mixed_precision=not args.no_mixed_precision)
    except (ValueError, TypeError) as exc:
        print(f"moreh-ap plan: error: {exc}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    ids = torch.empty(args.batch_size, args.seq_len, dtype=torch.long, device="meta")
    graph = trace(model, (ids,), {"labels": ids})
    facts = tp_facts(model, (ids,), {"labels": ids})
    if config is not None:
        return _evaluate(graph, config, cluster=cluster, args=args, tp=facts)
    try:
        result = plan_graph(graph, cluster=cluster, options=options, optimizer=args.optimizer, dump=True,
                            started=started, tp=facts)
    except NoFeasibleConfigError as exc:
        print(f"moreh-ap plan: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"moreh-ap plan: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        d = result.to_dict()
        print(json.dumps(d))
    else:
        print(candidate_table(result.candidates, result.config))
        print()
        print(result.summary())
    return 0


def _evaluate(graph, config, *, cluster, args, tp=None) -> int:
    """``--config LINE``: print that configuration's prediction as one JSON object (exit 0; 1 when invalid)."""
    world = cluster.world_size
    try:
        config.validate(world, args.batch_size, graph.num_blocks)
    except ValueError as exc:
        print(f"moreh-ap plan: error: --config is not valid for world size {world}, global batch "
              f"{args.batch_size}: {exc}", file=sys.stderr)
        return 1
    cand = evaluate_config(graph, config, cluster=cluster, optimizer=args.optimizer, tp=tp)
    out = cand.to_dict()
    out.update(memory_cap=int(cluster.device_memory * read_env().memory_usage_correction_ratio / 100),
               peak_bytes=cand.memory.total, calibration=cluster.calibration.source if cluster.calibration else None,
               model={"name": graph.model_name, "params": graph.total_params, "blocks": graph.num_blocks})
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moreh-ap`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "plan":
        return run_plan(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
