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


def check_onnx_ops(graph, path) -> None:
    """Raise naming each ONNX node whose op type TVM's ``from_onnx`` has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"If", "Constant"}
    missing = [
        f"{node.op_type} at node {node.name or f'#{index}'} (domain {node.domain or 'ai.onnx'})"
        for index, node in enumerate(graph.node)
        if node.op_type not in supported or node.domain not in _KNOWN_DOMAINS
    ]
    _raise_if_any(missing, f"ONNX file {path}", "the export (opset, fused contrib ops) to standard ONNX ops")


def _source_line(node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return frames[-1] if frames else "no source location recorded"


def _raise_if_any(missing: list[str], where: str, advice: str) -> None:
    if not missing:
        return
    listed = "\n  ".join(missing[:_MAX_LISTED])
    more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    raise LowbitError(
        f"{where} has {len(missing)} node(s) with operators lowbit cannot import:\n  {listed}{more}\n"
        f"Change {advice}."
    )
