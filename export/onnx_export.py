"""ONNX: export the static module, check it, convert to FP16, attach metadata, prove TensorRT readiness.

The exporter is torch's TorchScript-based one (``dynamo=False``): it is an order of magnitude faster than the
dynamo exporter on these graphs, folds constants, and emits opset 17 (inside TensorRT 8.5 - 11's range).
Input ``images`` (B, C, H, W) float32 raw in [0, 1]; output ``logits`` (B, classes) float32; only B is dynamic.
"""
from __future__ import annotations

import importlib
import io
import json
import warnings

import torch
from torch import nn

from fmkt.errors import FmktError
from fmkt.export.trt_operators import ADDED_SOURCE, BASELINE, CONSTANT_INPUTS, TRT_OPSET_MAX, TRT_OPSET_MIN, op_since
from fmkt.export.trt_operators import SOURCE as TRT_SOURCE

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_OPSET = 17
OPSET_RANGE = (13, 20)  # what the TorchScript exporter writes and onnxruntime runs


def require(name: str, extra: str = "export"):
    """Import an optional dependency or say in one sentence how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FmktError(f"{name} is not installed; install fmkt's {extra} extra (pip install onnx onnxscript "
                        f"onnxruntime) and rerun.") from None


def export_onnx(module: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET):
    """Trace ``module`` on ``example`` (B >= 2, so the batch is not baked in) -> onnx.ModelProto (run cleanup())."""
    onnx = require("onnx")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise FmktError(f"--opset {opset} is outside the supported range {OPSET_RANGE[0]}-{OPSET_RANGE[1]}; "
                        f"the default {DEFAULT_OPSET} suits TensorRT 8.5 and newer.")
    if example.shape[0] < 2:
        raise ValueError("trace with batch >= 2, or the exporter bakes the batch size into the graph")
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
        )
    return onnx.load_from_string(buf.getvalue())


def onnx_graph(module: nn.Module, example: torch.Tensor, precision: str = "fp32", opset: int = DEFAULT_OPSET):
    """The one ONNX export sequence (``fmkt-cli export`` and bench): export, cleanup, then FP16 when asked."""
    graph = cleanup(export_onnx(module, example, opset))
    return to_fp16(graph) if precision == "fp16" else graph


def cleanup(model):
    """Constant folding and redundant-node removal by onnxruntime's basic (standard-ONNX-only) optimizer.

    It folds what the tracer left as runtime arithmetic on static shapes (padding amounts, attention masks), so
    every non-batch dimension is static; unused opset imports it adds are dropped again.
    """
    folded = ort_fold(model)
    used = {n.domain for n in folded.graph.node} | {""}
    keep = [o for o in folded.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del folded.opset_import[:]
    folded.opset_import.extend(keep)
    folded.producer_name, folded.producer_version = model.producer_name, model.producer_version
    return check_onnx(folded)


def ort_fold(model):
    """``model`` as onnxruntime's basic optimizer leaves it (constant folding, redundant nodes removed)."""
    onnx, ort = require("onnx"), require("onnxruntime")
    import os
    import tempfile

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def check_onnx(model):
    """onnx.checker (full check) and strict shape inference; returns the model with inferred shapes."""
    onnx = require("onnx")
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeError(f"the exported ONNX graph does not pass onnx's checks: {exc}") from exc


def to_fp16(model):
    """An FP16 graph (weights and compute) whose input and output stay float32.

    The folded-in input normalisation (x - mean) / std runs in float32 on the float32 images and its result is
    cast once: rounded to fp16 first, the images and the mean and std shift pixels alike, an error the backbone
    does not average out (fashion-mnist at 32, 1 epoch, K=2, max abs logit difference to PyTorch fp32 on 512 test
    images: ConvNeXt-atto 4.5e-2 -> 5.4e-3, DeiT-Tiny 7.9e-3 -> 9e-4; MobileNetV3-small-050 5.0e-2 either way)."""
    require("onnx")
    float16 = require("onnxruntime.transformers.float16")
    half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                            op_block_list=float16.DEFAULT_OP_BLOCK_LIST,
                                            node_block_list=input_normalisation(model))
    _drop_cast_round_trips(half.graph, {n.name for n in model.graph.node})
    _topological_sort(half.graph)  # the converter appends its input Casts after their consumers
    return check_onnx(half)


def _drop_cast_round_trips(graph, original: set) -> None:
    """Remove the converter's float32 -> float16 -> float32 Cast pairs between float32 nodes (around the kept
    normalisation): the float32 tensor goes straight on. Casts the source graph had (``original``) stay."""
    onnx = require("onnx")
    producer = {o: n for n in graph.node for o in n.output}
    users: dict = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    to = lambda n: next((a.i for a in n.attribute if a.name == "to"), None)  # noqa: E731
    drop = []
    for back in graph.node:
        there = producer.get(back.input[0]) if back.op_type == "Cast" else None
        if (there is None or there.op_type != "Cast" or {back.name, there.name} & original
                or to(back) != onnx.TensorProto.FLOAT or to(there) != onnx.TensorProto.FLOAT16
                or len(users[there.output[0]]) != 1 or back.output[0] in outputs):
            continue
        for user in users.get(back.output[0], []):
            user.input[:] = [there.input[0] if i == back.output[0] else i for i in user.input]
        drop += [there, back]
    for n in drop:
        graph.node.remove(n)


def input_normalisation(model) -> list[str]:
    """Names of the elementwise nodes with constant operands that the graph input runs through first (the
    folded-in normalisation: Sub mean, Div std)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names, tensor = [], model.graph.input[0].name
    while True:
        users = [n for n in model.graph.node if tensor in n.input]
        if len(users) != 1 or users[0].op_type not in ("Sub", "Div", "Mul", "Add") or not users[0].name:
            return names
        if not set(users[0].input) - {tensor} <= constants:
            return names
        names.append(users[0].name)
        tensor = users[0].output[0]


def _topological_sort(graph) -> None:
    """Reorder graph.node in place so every node comes after the producers of its inputs (stable)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not set(n.input) <= ready]
        done = [n for n in pending if set(n.input) <= ready]
        if not done:
            raise RuntimeError("the ONNX graph has a cycle or an input no node produces")
        for n in done:
            ordered.append(n)
            ready.update(n.output)
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def set_metadata(model, meta: dict) -> None:
    """Each top-level key as a metadata_props entry (JSON for non-strings), plus the whole under 'fmkt_export'."""
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    entry = model.metadata_props.add()
    entry.key, entry.value = "fmkt_export", json.dumps(meta)
    model.producer_name, model.doc_string = "fmkt", "fmkt static graph: raw images in [0, 1] -> logits"


def read_metadata(model) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props["fmkt_export"]) if "fmkt_export" in props else {}


def all_graphs(graph) -> list:
    """``graph`` and the subgraphs inside it (If branches, Loop and Scan bodies), depth first."""
    subs = [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
    subs += [g for n in graph.node for a in n.attribute for g in a.graphs]
    return [graph] + [s for sub in subs for s in all_graphs(sub)]


def graph_summary(model) -> dict:
    """Node count, op histogram (subgraphs included), opset and whether any control flow (Loop, If, Scan) is left."""
    ops: dict[str, int] = {}
    nodes = [n for g in all_graphs(model.graph) for n in g.node]
    for node in nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return {"nodes": len(nodes), "ops": dict(sorted(ops.items())), "opset": opset,
            "control_flow": sorted(op for op in ops if op in ("Loop", "If", "Scan"))}


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return [None]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def trt_readiness(model) -> list[str]:
    """Problems that would stop TensorRT from building this graph (empty = ready, on :func:`min_tensorrt`).

    Checks: every op (default domain) is in TensorRT's supported ONNX operators (the 8.5 list or an op a later
    parser added, which raises the minimum version instead), no control flow, the opset is within TensorRT's
    range, inputs the matrix requires constant are constant, and every tensor's shape is known with only dim 0
    (the batch) dynamic.
    """
    return op_problems(model) + static_shape_problems(model)


def op_problems(model, allow_control_flow: bool = False) -> list[str]:
    """:func:`trt_readiness` without the static-shape check: ops (subgraphs included), domains, opset, control flow
    (unless allowed: TensorRT's parser reads If; a detection graph's NMS sits in one) and constant inputs."""
    problems = []
    summary = graph_summary(model)
    lo, hi = TRT_OPSET_MIN, max(TRT_OPSET_MAX.values())
    if not lo <= summary["opset"] <= hi:
        problems.append(f"opset {summary['opset']} is outside TensorRT's range {lo}-{hi}")
    if summary["opset"] > TRT_OPSET_MAX["8.5"]:
        problems.append(f"opset {summary['opset']} needs TensorRT 10 or newer (8.5 reads up to 17)")
    graphs = all_graphs(model.graph)
    nodes = [n for g in graphs for n in g.node]
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name} uses the custom domain {node.domain!r}")
        elif op_since(node.op_type) is None:
            problems.append(f"op {node.op_type} (node {node.name}) is not in TensorRT's supported ONNX operators")
    if summary["control_flow"] and not allow_control_flow:
        problems.append(f"control flow left in the graph: {', '.join(summary['control_flow'])}")
    constants = {i.name for g in graphs for i in g.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    for node in nodes:
        for pos in CONSTANT_INPUTS.get(node.op_type, ()):
            if pos < len(node.input) and node.input[pos] and node.input[pos] not in constants:
                problems.append(f"input {pos} of {node.op_type} node {node.name} must be a constant for TensorRT")
    return problems


def trt_ops(model) -> dict:
    """Each op of the graph: {"count": nodes, "tensorrt": the oldest TensorRT whose parser reads it, or None}."""
    return {op: {"count": n, "tensorrt": op_since(op)} for op, n in graph_summary(model)["ops"].items()}


def min_tensorrt(model) -> str:
    """The oldest TensorRT that reads every op of the graph: "8.5", or "8.6" for LayerNormalization (opset 17's
    op; ``--opset 16`` decomposes it for 8.5). The opset's own limit is a problem of :func:`trt_readiness`."""
    versions = [v for v in (op_since(op) for op in graph_summary(model)["ops"]) if v is not None]
    return max(versions + [BASELINE], key=lambda v: tuple(int(p) for p in v.split(".")))


def readiness_report(model) -> dict:
    """export.json's ``tensorrt_readiness``: ready, the minimum TensorRT, the op list, the problems, the sources."""
    problems = trt_readiness(model)
    return {"ready": not problems, "min_tensorrt": min_tensorrt(model), "ops": trt_ops(model),
            "problems": problems, "operator_list": TRT_SOURCE, "added_operators": ADDED_SOURCE}


def static_shape_problems(model, batch: int = 3) -> list[str]:
    """Fix the batch to ``batch`` and infer shapes: every tensor must then be fully static (so the batch is the
    only dynamic dimension; onnx cannot name products like batch * windows, hence the concrete batch).

    onnx's data propagation stops at Equal/Where, which the tracer writes for ``expand(B, -1, -1)`` (a ViT's class
    token), so a tensor left unknown is checked again after onnxruntime folds the fixed-batch copy (its Shape
    nodes are constants then): what is still not static there is a problem."""
    onnx = require("onnx")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in [*fixed.graph.input, *fixed.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    problems = _dynamic_tensors(onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True))
    if problems:
        try:
            folded = ort_fold(fixed)
        except Exception:  # noqa: BLE001 - a graph onnxruntime cannot load keeps the problems found above
            return problems
        del folded.graph.value_info[:]
        problems = _dynamic_tensors(onnx.shape_inference.infer_shapes(folded, strict_mode=True, data_prop=True))
    return problems


def _dynamic_tensors(inferred) -> list[str]:
    problems = []
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        dims = _dims(vi)
        if not all(isinstance(d, int) for d in dims):
            problems.append(f"tensor {vi.name} has a dynamic dimension other than the batch: {dims}")
    return problems


def cuda_provider_options(precision: str) -> dict:
    """ONNX Runtime CUDA provider options for ``precision``: fp32 means IEEE fp32, so TF32 is off (the provider
    allows it by default, and its ~1e-3 error would fail the fp32 parity gate of 1e-4)."""
    return {"use_tf32": "0"} if precision == "fp32" else {}


def ort_session(model_bytes: bytes, precision: str = "fp32"):
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # a few parity calls alternate with PyTorch's reference: threads spinning after each call only take its cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = ([("CUDAExecutionProvider", cuda_provider_options(precision))]
                 if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(model_bytes, opts, providers=providers)


def ort_run(session, images: torch.Tensor) -> torch.Tensor:
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().cpu().float().numpy()})
    return torch.from_numpy(out)


def write_export(job) -> list:
    """The onnx format (formats.EXPORT_FORMATS): model.onnx (checked, FP16 if asked, its summary, TensorRT readiness
    and the export metadata inside) and its parity in ONNX Runtime."""
    example = job.images[:2] if len(job.images) >= 2 else job.images.repeat(2, 1, 1, 1)  # trace with B >= 2
    graph = onnx_graph(job.module, example, job.precision, job.opset)
    job.meta["graph_summary"] = graph_summary(graph)
    job.meta["tensorrt_readiness"] = readiness_report(graph)
    set_metadata(graph, job.meta)
    data = graph.SerializeToString()
    (job.tmp / "model.onnx").write_bytes(data)
    job.files["onnx"] = "model.onnx"
    session = ort_session(data, job.precision)
    return [job.parity(lambda x: ort_run(session, x), f"onnxruntime {session.get_providers()[0]}")]
