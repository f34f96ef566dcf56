"""Kernels side by side in one run: lowbit's W4 GEMV and GEMMs against ONNX Runtime's on this CPU.

Rows (``--json`` prints ``{"rows": [...]}``):

* ``w4_gemv_1xKxN_gG``: decode GEMV, int4 weights in groups of G, COLD: every call reads another
  copy of the weights, rotating through copies totalling at least 3x the L3 cache. lowbit's
  ``w4a8`` kernel (int8 activations per group, byte dot products; the row's ``lowbit_ms``) and its
  ``w4a16`` kernel (``lowbit_w4a16_ms``) against ORT's ``MatMulNBits`` (accuracy level 4: its int8
  path). ``bw_fraction``: the weight bytes (codes + scales) per second of lowbit's kernel as a share
  of the DRAM read bandwidth measured in the same run (the faster of a numpy and a TVM read probe).
* ``w4a8_gemm_MxKxN_g128``: prefill GEMM (warm) against ``MatMulNBits`` with M rows.
* ``w8a8_gemm_MxKxN``: lowbit's W8A8 (dynamic per-token int8 activations) against ORT's
  ``DynamicQuantizeMatMul`` (com.microsoft: int8 weights per channel, activations quantized per
  tensor at run time).

Medians of interleaved blocks, 2 threads everywhere (TVM's pool, ORT's global intra-op pool).

    python bench/kernels.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_spine import bandwidth_probes, l3_bytes, lowbit_revision, machine_description, write_results  # noqa: E402

BENCH = Path(__file__).resolve().parent
SECTION = "## Kernels with the peers (issue 11)"
GEMVS = [(4096, 4096, 128), (4096, 11008, 128), (4096, 4096, 32), (4096, 11008, 32)]  # K, N, group
W4A8_GEMMS = [(128, 4096, 4096)]
W8A8_GEMMS = [(128, 4096, 4096), (512, 4096, 4096)]


def _ort():
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(THREADS, 1)
    return ort


ORT = None


def ort_session(node, inputs, outputs, initializers):
    from onnx import helper, numpy_helper

    graph = helper.make_graph([node], "k", inputs, outputs,
                              initializer=[numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ORT.SessionOptions()
    options.use_per_session_threads = False
    return ORT.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_nbits(m, k, n, group, codes, scales):
    """ORT MatMulNBits on codes ``[K, N]`` (zero point 8) and scales ``[K/G, N]``."""
    from onnx import TensorProto, helper

    nk = np.ascontiguousarray(codes.T).reshape(n, k // group, group // 2, 2)
    b = (nk[..., 0] | (nk[..., 1] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=group, accuracy_level=4)
    session = ort_session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
                          {"B": b, "scales": np.ascontiguousarray(scales.T).reshape(-1)})
    return lambda x: session.run(None, {"A": x})[0]


class LowbitLinear:
    """One lowbit kernel (``recipe``'s format, the host target's layout and rules) and its weights."""

    def __init__(self, recipe: str, m: int, k: int, n: int):
        import tvm
        from tvm import tirx

        from lowbit.compiler import get_recipe
        from lowbit.codegen.kernels import linear_kernel
        from lowbit.passes.quantize_linears import pack_linear
        from lowbit.targets import get_target, schedule

        self.tvm, self.pack_linear, self.recipe = tvm, pack_linear, get_recipe(recipe)
        self.chip = get_target("host")
        probe = pack_linear(np.zeros((n, k), np.float32) + 0.01, self.recipe, "w", self.chip)
        m_arg = 1 if m == 1 else tirx.Var("m", "int64")
        func = linear_kernel(probe.fmt, probe.layout, m_arg, probe.layout.padded(n), k)
        self.func = tvm.compile(schedule(func, self.chip).mod, target=self.chip.tvm()).jit()["main"]
        self.out = tvm.runtime.tensor(np.zeros((m, probe.layout.padded(n)), np.float32), tvm.cpu())
        self.copies = []

    def add(self, weight_nk: np.ndarray, copies: int = 1) -> int:
        """Pack ``weight_nk``; keep ``copies`` separate copies of its tensors (for cold timings)."""
        packed = self.pack_linear(weight_nk, self.recipe, "w", self.chip)
        for _ in range(copies):
            self.copies.append([self.tvm.runtime.tensor(a.copy(), self.tvm.cpu()) for a in packed.tensors.values()])
        self.dequantized, self.quantized = packed.quantized.dequantize(), packed.quantized
        return sum(a.nbytes for a in packed.tensors.values())

    def __call__(self, x, i=0):
        if not isinstance(x, self.tvm.runtime.Tensor):
            x = self.tvm.runtime.tensor(x, self.tvm.cpu())
        self.func(x, *self.copies[i], self.out)
        return self.out


def timed(calls, repeats: int) -> list[float]:
    """Seconds per call of each of ``calls`` (callables), in ``repeats`` interleaved blocks."""
    times = [[] for _ in calls]
    for _ in range(repeats):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def gemv_rows(rounds: int, dram: float) -> list[dict]:
    rows = []
    for k, n, group in GEMVS:
        rng = np.random.default_rng(k + n + group)
        w4a8, w4a16 = LowbitLinear(f"w4a8-rtn-g{group}", 1, k, n), LowbitLinear(f"w4a16-rtn-g{group}", 1, k, n)
        weight = rng.standard_normal((n, k)).astype(np.float32)
        copy_bytes = w4a8.pack_linear(weight, w4a8.recipe, "w", w4a8.chip).quantized.codes.size // 2
        copies = max(2, -(-3 * l3_bytes() // copy_bytes))  # the same values in separate memory: cold caches
        copy_bytes = w4a8.add(weight, copies)
        w4a16.add(weight, copies)
        quantized = w4a8.quantized
        ort_calls = [matmul_nbits(1, k, n, group, quantized.codes, quantized.scales) for _ in range(copies)]
        x = rng.standard_normal((1, k)).astype(np.float32)
        x_tvm = w4a8.tvm.runtime.tensor(x, w4a8.tvm.cpu())

        def cold(call_copy):
            def run():
                for i in range(copies):
                    call_copy(i)
            return run

        per_pass = timed([cold(lambda i: w4a8(x_tvm, i)), cold(lambda i: w4a16(x_tvm, i)),
                          cold(lambda i: ort_calls[i](x))], rounds)
        lowbit_s, w4a16_s, ort_s = (t / copies for t in per_pass)
        reference = x.astype(np.float64) @ w4a8.dequantized.T
        error = float(np.abs(w4a8(x_tvm, copies - 1).numpy()[0, :n] - reference[0]).max() / np.abs(reference).max())
        rows.append({"name": f"w4_gemv_1x{k}x{n}_g{group}", "lowbit_ms": round(lowbit_s * 1e3, 4),
                     "lowbit_w4a16_ms": round(w4a16_s * 1e3, 4), "peer": "ORT MatMulNBits (accuracy level 4)",
                     "peer_ms": round(ort_s * 1e3, 4), "speedup": round(ort_s / lowbit_s, 2),
                     "bw_fraction": round(copy_bytes / lowbit_s / 1e9 / dram, 3), "weight_mb": round(copy_bytes / 1e6, 2),
                     "copies": copies, "max_rel_error": error})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def w4a8_gemm_rows(rounds: int) -> list[dict]:
    rows = []
    for m, k, n in W4A8_GEMMS:
        rng = np.random.default_rng(m + k + n)
        weight = rng.standard_normal((n, k)).astype(np.float32)
        kernel = LowbitLinear("w4a8-rtn-g128", m, k, n)
        kernel.add(weight)
        quantized = kernel.pack_linear(weight, kernel.recipe, "w", kernel.chip).quantized
        peer = matmul_nbits(m, k, n, 128, quantized.codes, quantized.scales)
        x = rng.standard_normal((m, k)).astype(np.float32)
        x_tvm = kernel.tvm.runtime.tensor(x, kernel.tvm.cpu())
        lowbit_s, ort_s = timed([lambda: kernel(x_tvm), lambda: peer(x)], rounds * 10)
        rows.append({"name": f"w4a8_gemm_{m}x{k}x{n}_g128", "lowbit_ms": round(lowbit_s * 1e3, 3),
                     "peer": "ORT MatMulNBits (accuracy level 4)", "peer_ms": round(ort_s * 1e3, 3),
                     "speedup": round(ort_s / lowbit_s, 2)})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def w8a8_gemm_rows(rounds: int) -> list[dict]:
    from onnx import TensorProto, helper

    rows = []
    for m, k, n in W8A8_GEMMS:
        rng = np.random.default_rng(m + k + n)
        weight = rng.standard_normal((n, k)).astype(np.float32)
        kernel = LowbitLinear("w8a8-naive", m, k, n)
        kernel.add(weight)
        scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
        codes = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "b_scale"], ["Y"], domain="com.microsoft")
        session = ort_session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
                              {"B": np.ascontiguousarray(codes.T), "b_scale": scale})
        x = rng.standard_normal((m, k)).astype(np.float32)
        x_tvm = kernel.tvm.runtime.tensor(x, kernel.tvm.cpu())
        lowbit_s, ort_s = timed([lambda: kernel(x_tvm), lambda: session.run(None, {"A": x})], rounds * 5)
        rows.append({"name": f"w8a8_gemm_{m}x{k}x{n}", "lowbit_ms": round(lowbit_s * 1e3, 3),
                     "peer": "ORT DynamicQuantizeMatMul", "peer_ms": round(ort_s * 1e3, 3),
                     "speedup": round(ort_s / lowbit_s, 2)})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    global ORT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    ORT = _ort()
    started = time.perf_counter()
    rounds = 3 if args.quick else 7
    probes = bandwidth_probes()
    dram = max(statistics.median([probe() for _ in range(5)]) for probe in probes.values())
    rows = gemv_rows(rounds, dram) + w4a8_gemm_rows(rounds) + w8a8_gemm_rows(rounds)
    report = {"rows": rows, "dram_GBps": round(dram, 1), "machine": machine_description()}
    (BENCH / ".cache").mkdir(exist_ok=True)
    (BENCH / ".cache" / "kernels.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    command = "python bench/kernels.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    lines = [SECTION, "", f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}. Machine: "
             f"{report['machine']}. {lowbit_revision()}.", "", f"Command: `{command}`", "",
             f"DRAM read bandwidth in this run: {dram:.1f} GB/s (2 threads). GEMV rows are cold (copies totalling "
             f"3x the L3); GEMMs warm. ms per call, medians of {rounds} interleaved blocks; speedup = peer / lowbit.",
             "", "| kernel | lowbit ms | lowbit w4a16 ms | peer | peer ms | speedup | share of DRAM BW |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['lowbit_ms']:.3f} | {r.get('lowbit_w4a16_ms', '')} | {r['peer']} | "
                     f"{r['peer_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{'' if 'bw_fraction' not in r else format(r['bw_fraction'], '.0%')} |")
    lines.append(f"\nWhole run: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    if not args.json:
        print(text)
    if not args.no_write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
