"""Find every operator a frontend cannot import, before importing, and report them all at once.

TVM's importers stop at the first failure or list bare op names; users need the node and the source
line that produced it to decide what to change (an export flag, a config option, a custom op).
"""

from __future__ import annotations

from lowbit.codegen.errors import LowbitError

_MAX_LISTED = 20
_KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")  # TVM converts some ONNX Runtime contrib ops too


def check_exported_ops(program, extra_converters=()) -> None:
    """Raise naming each ``torch.export`` node whose op ``from_exported_program`` cannot convert."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    supported = set(ExportedProgramImporter().create_convert_map()) | set(extra_converters)
    missing = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target))
        if op not in supported:
            missing.append(f"{op} at node {node.name} ({_source_line(node)})")
    _raise_if_any(missing, "torch.export graph", "the model's code (or its config: attention implementation, "
                  "cache type) so it exports to supported aten ops")


# ONNX Runtime's contrib ops that LLM exports use (ONNX Runtime GenAI's model builder, ORT's fusions):
# domain com.microsoft, except SimplifiedLayerNormalization, which ONNX Runtime registers in the
# default domain.
ORT_CONTRIB_OPS = ("GroupQueryAttention", "MatMulNBits", "RotaryEmbedding", "SkipSimplifiedLayerNormalization",
                   "SimplifiedLayerNormalization", "MultiHeadAttention", "PackedMultiHeadAttention",
                   "SparseAttention", "GatherBlockQuantized", "QMoE", "MoE", "FusedMatMul", "QuickGelu")


def check_onnx_ops(graph, path) -> None:
    """Raise naming each ONNX op type TVM's ``from_onnx`` has no converter for: its domain, its
    first node and how many nodes use it; ONNX Runtime contrib ops are said to be that, with what
    to export instead."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"If", "Constant"}
    nodes: dict[tuple[str, str], list[str]] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in supported or node.domain not in _KNOWN_DOMAINS:
            nodes.setdefault((node.op_type, node.domain or "ai.onnx"), []).append(node.name or f"#{index}")
    if not nodes:
        return
    missing = [f"{op} at node {names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} (domain {domain})"
               for (op, domain), names in nodes.items()]
    contrib = [op for op, domain in nodes if domain == "com.microsoft" or op in ORT_CONTRIB_OPS]
    advice = "the export (opset, fused contrib ops) to standard ONNX ops"
    if contrib:
        kind = "is an ONNX Runtime contrib op" if len(contrib) == 1 else "are ONNX Runtime contrib ops"
        advice = (f"the export: {', '.join(contrib)} {kind} "
                  "(the fused format ONNX Runtime GenAI models ship in), which lowbit does not import. Export the "
                  "model with standard ONNX ops instead (torch.onnx.export(..., dynamo=True) of the Hugging Face "
                  "model, or optimum's exporter without ONNX Runtime fusions), or compile the Hugging Face folder "
                  "itself")
    _raise_if_any(missing, f"ONNX file {path}", advice, sum(len(names) for names in nodes.values()))


def _source_line(node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return frames[-1] if frames else "no source location recorded"


def _raise_if_any(missing: list[str], where: str, advice: str, count: int | None = None) -> None:
    """``missing``: one line per problem; ``count``: the nodes they cover (default one per line)."""
    if not missing:
        return
    count = len(missing) if count is None else count
    listed = "\n  ".join(missing[:_MAX_LISTED])
    more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    raise LowbitError(
        f"{where} has {count} node(s) with operators lowbit cannot import:\n  {listed}{more}\n"
        f"Change {advice}."
    )
