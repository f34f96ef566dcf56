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

Each runtime runs in a worker process of its own (:class:`Side`); the parent times them in turns.
Medians of interleaved rounds, 2 threads everywhere (TVM's pool, ORT's global intra-op pool).

    python bench/kernels.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import traceback

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
        from lowbit.codegen.host_cpu import TILE_CAPABILITY, request_tile_state
        from lowbit.codegen.kernels import linear_kernel
        from lowbit.passes.quantize_linears import pack_linear
        from lowbit.targets import get_target, schedule

        self.tvm, self.pack_linear, self.recipe = tvm, pack_linear, get_recipe(recipe)
        self.chip = get_target("host")
        if TILE_CAPABILITY in self.chip.capabilities:  # AMX: the OS grants the tile state on request
            request_tile_state()
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


def quantized_int4(k: int, n: int, group: int, weight: np.ndarray):
    """The int4 codes and scales lowbit's RTN gives ``weight`` (both sides run on these)."""
    from lowbit.compiler import get_recipe
    from lowbit.passes.quantize_linears import pack_linear
    from lowbit.targets import get_target

    return pack_linear(weight, get_recipe(f"w4a16-rtn-g{group}"), "w", get_target("host")).quantized


def _weight(k: int, n: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((n, k)).astype(np.float32)


# Builders: each makes, in a worker process, ``(run, info)``: a callable that runs the kernel once
# (a cold GEMV: once per copy of its weights) and a dict reported back to the parent.

def build_lowbit_gemv(recipe: str, k: int, n: int, group: int):
    rng, weight = _weight(k, n, k + n + group)
    kernel = LowbitLinear(recipe, 1, k, n)
    codes = kernel.pack_linear(weight, kernel.recipe, "w", kernel.chip).quantized.codes.size // 2
    copies = max(2, -(-3 * l3_bytes() // codes))  # the same values in separate memory: cold caches
    copy_bytes = kernel.add(weight, copies)
    x = kernel.tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32), kernel.tvm.cpu())
    reference = x.numpy().astype(np.float64) @ kernel.dequantized.T
    error = float(np.abs(kernel(x, copies - 1).numpy()[0, :n] - reference[0]).max() / np.abs(reference).max())

    def run():
        for i in range(copies):
            kernel(x, i)
    return run, {"copies": copies, "copy_bytes": copy_bytes, "max_rel_error": error}


def build_ort_gemv(k: int, n: int, group: int):
    rng, weight = _weight(k, n, k + n + group)
    quantized = quantized_int4(k, n, group, weight)
    copies = max(2, -(-3 * l3_bytes() // (quantized.codes.size // 2)))
    calls = [matmul_nbits(1, k, n, group, quantized.codes, quantized.scales) for _ in range(copies)]
    x = rng.standard_normal((1, k)).astype(np.float32)

    def run():
        for call in calls:
            call(x)
    return run, {"copies": copies}


def build_lowbit_gemm(recipe: str, m: int, k: int, n: int):
    rng, weight = _weight(k, n, m + k + n)
    kernel = LowbitLinear(recipe, m, k, n)
    kernel.add(weight)
    x = kernel.tvm.runtime.tensor(rng.standard_normal((m, k)).astype(np.float32), kernel.tvm.cpu())
    return lambda: kernel(x), {}


def build_ort_w4a8_gemm(m: int, k: int, n: int):
    rng, weight = _weight(k, n, m + k + n)
    quantized = quantized_int4(k, n, 128, weight)
    call = matmul_nbits(m, k, n, 128, quantized.codes, quantized.scales)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return lambda: call(x), {}


def build_ort_w8a8_gemm(m: int, k: int, n: int):
    from onnx import TensorProto, helper

    rng, weight = _weight(k, n, m + k + n)
    scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
    codes = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "b_scale"], ["Y"], domain="com.microsoft")
    session = ort_session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
                          {"B": np.ascontiguousarray(codes.T), "b_scale": scale})
    x = rng.standard_normal((m, k)).astype(np.float32)
    return lambda: session.run(None, {"A": x}), {}


def _serve(conn) -> None:
    """A worker process: builds kernels by builder name, times them on request, until told to stop."""
    global ORT
    kernels = {}
    while True:
        op, args = conn.recv()
        try:
            if op == "stop":
                conn.send((True, None))
                return
            if op == "build":
                name, builder, params = args
                if builder.startswith("build_ort") and ORT is None:
                    ORT = _ort()
                kernels[name], info = globals()[builder](**params)
                conn.send((True, info))
            elif op == "drop":
                kernels.clear()
                conn.send((True, None))
            else:  # "time": one warm-up call, then seconds per call of `calls` calls
                name, calls = args
                run = kernels[name]
                run()
                seconds = []
                for _ in range(calls):
                    start = time.perf_counter()
                    run()
                    seconds.append(time.perf_counter() - start)
                conn.send((True, seconds))
        except Exception:  # reported to the parent, which raises it
            conn.send((False, traceback.format_exc()))


class Side:
    """One runtime in a process of its own. Two thread pools in one process spin against each other:
    measured here, a lowbit GEMM called right after an ORT call took 11.0 ms and 5.8 ms once ORT's
    workers had gone to sleep (100 ms later); in separate processes neither waits on the other."""

    def __init__(self, context):
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()

    def __call__(self, op: str, *args):
        self._conn.send((op, args))
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"bench worker failed:\n{value}")
        return value

    def close(self) -> None:
        self("stop")
        self._process.join()


def timed(kernels, rounds: int, calls: int) -> list[float]:
    """Seconds per call of each ``(side, name)`` kernel: in each of ``rounds`` interleaved rounds,
    each kernel's median of ``calls`` calls after a warm-up call (the other processes idle, 0.1 s
    apart so that their thread pools have stopped spinning); the median over rounds."""
    times = [[] for _ in kernels]
    for _ in range(rounds):
        for index, (side, name) in enumerate(kernels):
            time.sleep(0.1)
            times[index].append(statistics.median(side("time", name, calls)))
    return [statistics.median(t) for t in times]


def gemv_rows(lowbit: Side, ort: Side, rounds: int, dram: float) -> list[dict]:
    rows = []
    for k, n, group in GEMVS:
        shape = {"k": k, "n": n, "group": group}
        w4a8 = lowbit("build", "w4a8", "build_lowbit_gemv", {"recipe": f"w4a8-rtn-g{group}", **shape})
        lowbit("build", "w4a16", "build_lowbit_gemv", {"recipe": f"w4a16-rtn-g{group}", **shape})
        ort("build", "peer", "build_ort_gemv", shape)
        copies = w4a8["copies"]
        lowbit_s, w4a16_s, ort_s = (t / copies for t in timed([(lowbit, "w4a8"), (lowbit, "w4a16"), (ort, "peer")],
                                                               rounds, 1))
        lowbit("drop")
        ort("drop")
        rows.append({"name": f"w4_gemv_1x{k}x{n}_g{group}", "lowbit_ms": round(lowbit_s * 1e3, 4),
                     "lowbit_w4a16_ms": round(w4a16_s * 1e3, 4), "peer": "ORT MatMulNBits (accuracy level 4)",
                     "peer_ms": round(ort_s * 1e3, 4), "speedup": round(ort_s / lowbit_s, 2),
                     "bw_fraction": round(w4a8["copy_bytes"] / lowbit_s / 1e9 / dram, 3),
                     "weight_mb": round(w4a8["copy_bytes"] / 1e6, 2), "copies": copies,
                     "max_rel_error": w4a8["max_rel_error"]})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def gemm_rows(lowbit: Side, ort: Side, rounds: int) -> list[dict]:
    """The prefill GEMMs, warm: W4A8 against MatMulNBits, W8A8 against DynamicQuantizeMatMul."""
    cases = [(f"w4a8_gemm_{m}x{k}x{n}_g128", "w4a8-rtn-g128", "build_ort_w4a8_gemm",
              "ORT MatMulNBits (accuracy level 4)", (m, k, n)) for m, k, n in W4A8_GEMMS]
    cases += [(f"w8a8_gemm_{m}x{k}x{n}", "w8a8-naive", "build_ort_w8a8_gemm", "ORT DynamicQuantizeMatMul", (m, k, n))
              for m, k, n in W8A8_GEMMS]
    rows = []
    for name, recipe, peer_builder, peer, (m, k, n) in cases:
        lowbit("build", "gemm", "build_lowbit_gemm", {"recipe": recipe, "m": m, "k": k, "n": n})
        ort("build", "peer", peer_builder, {"m": m, "k": k, "n": n})
        lowbit_s, ort_s = timed([(lowbit, "gemm"), (ort, "peer")], rounds, 5)
        lowbit("drop")
        ort("drop")
        rows.append({"name": name, "lowbit_ms": round(lowbit_s * 1e3, 3), "peer": peer,
                     "peer_ms": round(ort_s * 1e3, 3), "speedup": round(ort_s / lowbit_s, 2)})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rounds = 3 if args.quick else 7
    probes = bandwidth_probes()
    dram = max(statistics.median([probe() for _ in range(5)]) for probe in probes.values())
    context = multiprocessing.get_context("spawn")
    lowbit, ort = Side(context), Side(context)
    try:
        rows = gemv_rows(lowbit, ort, rounds, dram) + gemm_rows(lowbit, ort, rounds)
    finally:
        lowbit.close()
        ort.close()
    report = {"rows": rows, "dram_GBps": round(dram, 1), "machine": machine_description()}
    (BENCH / ".cache").mkdir(exist_ok=True)
    (BENCH / ".cache" / "kernels.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    command = "python bench/kernels.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    lines = [SECTION, "", f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}. Machine: "
             f"{report['machine']}. {lowbit_revision()}.", "", f"Command: `{command}`", "",
             f"DRAM read bandwidth in this run: {dram:.1f} GB/s (2 threads). GEMV rows are cold (copies totalling "
             f"3x the L3); GEMMs warm. ms per call, medians of {rounds} interleaved rounds, each runtime in a "
             "process of its own; speedup = peer / lowbit.",
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
