"""Spine benchmark (issue 2): lowbit against its peers on this CPU, measured in one run.

PART A, end to end, SmolLM2-135M (``smollm2-135m``):
    prefill tokens/s (one pass over a 128-token prompt of English text) and decode tokens/s
    (32 greedy new tokens; the first comes from prefill, so 31 decode steps) for lowbit artifacts
    ``fp32``, ``w8a16-rtn`` and ``w4a16-rtn-g128`` (``Session.generate``) against torch fp32 eager
    (transformers, ``torch.set_num_threads(2)``): prefill = one forward over the prompt, decode =
    ``generate(max_new_tokens=32, min_new_tokens=32, do_sample=False)`` minus the median prefill time.
    The four runners take turns within each round so that any background load hits all of them.
    Artifacts are compiled once into the cache folder (``--cache``), keyed by recipe and by a hash of
    lowbit's compiler sources, and reused while those sources are unchanged.

PART B, the W4 decode GEMV kernel, M=1, N=11008 output channels, K=4096 inputs, int4 groups of 128,
symmetric (zero point 8): lowbit's ``linear_kernel`` scheduled by the host target's rule against
ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits=4, block_size=128, accuracy_level=4, 2 intra-op
threads in ORT's global pool shared by the per-copy sessions), both fed the same codes and scales. COLD: each call reads a different copy of the weights,
rotating through enough copies to exceed the L3 cache several times over; WARM: one copy, called
repeatedly (it fits in L3). DRAM read bandwidth is measured in the same run (a 512 MB read with
numpy on 2 threads and with a vectorized TVM reduction on 2 threads; the higher median is the
reference) and each kernel's effective weight bytes/s (codes + scales) is given as a share of it.

Run from the repository root (takes ~4 min more the first time, to compile the three artifacts)::

    python bench/bench_spine.py            # full repeats
    python bench/bench_spine.py --quick    # fewer repeats, a few minutes

It prints markdown tables and writes them, with the command, date and machine, into the section
"Spine (issue 2)" of bench/RESULTS.md (the rest of that file is kept).
"""

from __future__ import annotations

import no_shadowing  # noqa: F401  (first: bench/kernels.py must not pass for the kernels package)

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))  # before tvm is imported anywhere
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
SECTION = "## Spine (issue 2)"
MODEL = "smollm2-135m"
RECIPES = ("fp32", "w8a16-rtn", "w4a16-rtn-g128")
PROMPT_TOKENS = 128
NEW_TOKENS = 32
ALICE = Path("/tmp/dl/brotli-1.2.1/tests/testdata/alice29.txt")
FALLBACK_TEXT = (
    "The history of the printing press begins long before Gutenberg. Block printing, in which a whole "
    "page was carved into a single piece of wood, was practised in China by the ninth century, and "
    "movable type made of baked clay was described there some two hundred years later. In Europe, paper "
    "reached the monasteries and universities slowly, and for centuries books were copied by hand, one "
    "letter at a time, by scribes who worked in cold rooms with poor light. A single Bible could take a "
    "skilled copyist more than a year. When Johannes Gutenberg, a goldsmith from Mainz, combined metal "
    "type cast in a hand mould with an oil-based ink and a screw press adapted from those used for wine "
    "and olives, the cost of a book fell so sharply that within fifty years millions of volumes were in "
    "circulation across the continent. Scholars could compare identical copies of a text, errors could "
    "be corrected in later editions, and ideas travelled faster than any ruler could suppress them."
)

# PART B shape and format
GEMV_N, GEMV_K, GROUP = 11008, 4096, 128
COLD_BYTES = 128 << 20  # the rotated copies together exceed this and 8x the L3 size


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def median(values) -> float:
    return float(statistics.median(values))


class CpuLoad:
    """CPU time used by other processes while a part runs, in cores (from /proc/stat minus our own)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]
        own = os.times()
        return (sum(fields) - idle) / hz, time.monotonic(), own.user + own.system

    def others_cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, wall, own = (e - s for e, s in zip(end, self.start))
        return max(busy - own, 0.0) / wall if wall > 0 else None


def machine_description() -> str:
    model, l3 = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.M).group(1).split())
        isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    except (OSError, AttributeError):
        isa = []
    if Path("/sys/devices/system/cpu/cpu0/cache/index3/size").is_file():
        l3 = f", L3 {l3_bytes() >> 20} MiB"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {'/'.join(isa) or 'no AVX2'}{l3}, {mem_gb:.0f} GiB RAM"


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


def versions() -> str:
    import onnxruntime
    import torch
    import transformers
    import tvm

    return (f"apache-tvm {tvm.__version__}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}")


# ---------------------------------------------------------------------------------------------
# PART A: end to end
# ---------------------------------------------------------------------------------------------
def prompt_ids(tokenizer) -> tuple[list[int], str]:
    """The first ``PROMPT_TOKENS`` tokens of Alice in Wonderland (chapter I), or of a fixed paragraph."""
    if ALICE.is_file():
        text = ALICE.read_text(encoding="latin-1")
        start = text.find("Alice was beginning")
        text, source = " ".join(text[max(start, 0):].split()), f"{ALICE.name} (chapter I)"
    else:
        text, source = FALLBACK_TEXT, "a fixed paragraph in the script"
    ids = tokenizer(text)["input_ids"][:PROMPT_TOKENS]
    if len(ids) < PROMPT_TOKENS:
        raise SystemExit(f"prompt text gives only {len(ids)} tokens; need {PROMPT_TOKENS}")
    return ids, source


def lowbit_sources_hash() -> str:
    """A hash of the lowbit sources that shape an artifact (not the CLI, runtime or datasets)."""
    import lowbit.compiler

    root = Path(lowbit.compiler.__file__).resolve().parent.parent
    skip = ("compiler/cli.py", "compiler/runtime/", "compiler/sources/texts.py")
    digest = hashlib.sha256()
    for folder in ("compiler", "passes", "codegen", "targets"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(skip):
                digest.update(rel.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_artifact(recipe: str, cache: Path, rebuild: bool) -> tuple[Path, float | None]:
    """The cached artifact for ``recipe``, compiled now if absent; returns (path, compile seconds)."""
    from lowbit.compiler.api import compile as lowbit_compile
    from lowbit.compiler.runtime.artifact import read_manifest
    from lowbit.codegen.errors import LowbitError

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", recipe)  # recipe options (":keep=lm_head*") as a plain name
    path = cache / f"{MODEL}-{label}-{lowbit_sources_hash()}"
    if path.is_dir() and not rebuild:
        try:
            read_manifest(path)
            return path, None
        except LowbitError:
            pass  # damaged: compile again
    print(f"  compiling {MODEL} with {recipe} into {path} ...", file=sys.stderr)
    result = lowbit_compile(MODEL, recipe, "host", output=path, progress=False)
    for stale in cache.glob(f"{MODEL}-{label}-*"):  # artifacts of older sources
        if stale.is_dir() and stale.name != path.name and re.fullmatch(r"[0-9a-f]{12}", stale.name[-12:]):
            shutil.rmtree(stale)
    return path, result.seconds


def lowbit_revision() -> str:
    """The lowbit commit, and which of its source files differ from it (read-only git queries)."""
    import subprocess

    import lowbit.compiler

    root = Path(lowbit.compiler.__file__).resolve().parent.parent

    def git(*argv):
        return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True).stdout.rstrip()

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", "compiler", "passes", "codegen",
                                       "targets").splitlines()]
    return f"lowbit {commit}" + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "") + \
        f" (source hash {lowbit_sources_hash()})"


class TorchRunner:
    """transformers fp32 eager: prefill is one forward, decode is generate() minus that prefill."""

    name = "torch fp32 eager"

    def __init__(self, model, ids):
        import torch

        self.torch, self.model = torch, model
        self.ids = torch.tensor([ids])
        self.mask = torch.ones_like(self.ids)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.tokens = None

    def run_once(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of one prompt."""
        with self.torch.inference_mode():
            start = time.perf_counter()
            self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False,
                                      pad_token_id=self.model.config.eos_token_id)
            generate = time.perf_counter() - start
        self.tokens = out[0, self.ids.shape[1]:].tolist()
        return prefill, generate - prefill

    def prompt_top1(self) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(input_ids=self.ids).logits[0].argmax(-1).numpy()


class LowbitRunner:
    """A lowbit artifact through the public API: ``load(path).generate(ids, 32)``."""

    def __init__(self, recipe, path, ids):
        from lowbit.compiler.api import load

        self.name = f"lowbit {recipe}"
        self.session = load(path)
        self.ids = ids
        self.weight_bytes = int(self.session.manifest["weight_bytes"])
        self.tokens = None

    def run_once(self) -> tuple[float, float]:
        gen = self.session.generate(self.ids, max_new_tokens=NEW_TOKENS)
        if gen.new_tokens != NEW_TOKENS:
            raise SystemExit(f"{self.name} stopped at end-of-sequence after {gen.new_tokens} tokens")
        self.tokens = gen.token_ids
        return gen.prefill_seconds, gen.decode_seconds

    def prompt_top1(self) -> np.ndarray:
        self.session.reset()
        return self.session.prefill(self.ids).argmax(-1)


def agreeing_prefix(a, b) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def collect(tasks: dict, wanted: int, budget_s: float, threshold: float) -> tuple[dict, dict]:
    """Run every task of ``tasks`` (name -> zero-argument callable) in turn, round after round.

    A run counts as *quiet* when other processes used less than ``threshold`` cores meanwhile. Rounds
    go on until every task has ``wanted`` quiet runs, or ``budget_s`` has passed (then each task keeps
    its ``wanted`` least disturbed runs). Returns the kept results per task and a summary.
    """
    records = {name: [] for name in tasks}
    started, last_note = time.monotonic(), 0.0
    while True:
        for name, task in tasks.items():  # take turns so that background load hits every task alike
            probe = CpuLoad()
            result = task()
            load = probe.others_cores()
            records[name].append((0.0 if load is None else load, result))
        quiet = min(sum(load < threshold for load, _ in recs) for recs in records.values())
        rounds = len(records[next(iter(tasks))])
        elapsed = time.monotonic() - started
        if rounds >= wanted and (quiet >= wanted or elapsed > budget_s):
            break
        if elapsed - last_note > 20:
            last_note = elapsed
            print(f"  {quiet}/{wanted} quiet runs after {rounds} rounds, {elapsed:.0f}/{budget_s:.0f} s",
                  file=sys.stderr)
    kept = {}
    for name, recs in records.items():
        calm = [r for r in recs if r[0] < threshold]
        kept[name] = calm if len(calm) >= wanted else sorted(recs, key=lambda r: r[0])[:wanted]
    loads = [load for recs in kept.values() for load, _ in recs]
    summary = {"rounds": rounds, "kept_per_task": min(len(v) for v in kept.values()),
               "all_quiet": quiet >= wanted, "mean_other_cores": sum(loads) / len(loads),
               "max_other_cores": max(loads)}
    return {name: [result for _, result in recs] for name, recs in kept.items()}, summary


def part_a(args) -> tuple[str, dict]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from lowbit.compiler.sources.models import resolve_model

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cache = Path(args.cache)
    compiled = {}
    for recipe in RECIPES:
        compiled[recipe] = ensure_artifact(recipe, cache, args.rebuild)

    source = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    ids, text_source = prompt_ids(tokenizer)
    runners = [TorchRunner(source.model.eval(), ids)]
    runners += [LowbitRunner(recipe, compiled[recipe][0], ids) for recipe in RECIPES]
    top1 = [runner.prompt_top1() for runner in runners]
    for _ in range(args.warmup):
        for runner in runners:
            runner.run_once()

    runs, quiet = collect({r.name: r.run_once for r in runners}, args.rounds_e2e, args.max_wait,
                          args.quiet_cores)
    rates = {}
    for runner in runners:
        prefill = [PROMPT_TOKENS / p for p, _ in runs[runner.name]]
        decode = [(NEW_TOKENS - 1) / d for _, d in runs[runner.name]]
        rates[runner.name] = (median(prefill), max(prefill), median(decode), max(decode))
    torch_prefill, _, torch_decode, _ = rates[runners[0].name]
    rows = []
    lines = [
        f"Prompt: {PROMPT_TOKENS} tokens of {text_source}; {NEW_TOKENS} new tokens, greedy. "
        f"Medians (and best) of {quiet['kept_per_task']} runs per runner, after {args.warmup} warm-up "
        f"round(s); {THREADS} threads everywhere. Decode tokens/s counts the {NEW_TOKENS - 1} decode steps "
        "after the token that prefill yields. Ratios are of medians. Agreement: greedy tokens equal to "
        "torch's before the first difference, and prompt positions whose top-1 next token equals torch's.",
        "",
        "| runner | weights (MB) | prefill tok/s (best) | vs torch | decode tok/s (best) | vs torch "
        "| greedy = torch | prompt top-1 = torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for runner, runner_top1 in zip(runners, top1):
        prefill, best_prefill, decode, best_decode = rates[runner.name]
        agree = agreeing_prefix(runner.tokens, runners[0].tokens)
        top1_share = float(np.mean(runner_top1 == top1[0]))
        rows.append({"runner": runner.name, "weight_bytes": runner.weight_bytes, "prefill_tok_s": prefill,
                     "decode_tok_s": decode, "best_prefill_tok_s": best_prefill,
                     "best_decode_tok_s": best_decode, "prefill_vs_torch": prefill / torch_prefill,
                     "decode_vs_torch": decode / torch_decode, "greedy_tokens_equal_to_torch": agree,
                     "prompt_top1_equal_to_torch": top1_share})
        lines.append(f"| {runner.name} | {runner.weight_bytes / 1e6:.0f} | {prefill:.0f} ({best_prefill:.0f}) | "
                     f"{prefill / torch_prefill:.2f}x | {decode:.1f} ({best_decode:.1f}) | "
                     f"{decode / torch_decode:.2f}x | {agree}/{NEW_TOKENS} | {top1_share:.0%} |")
    notes = [f"{recipe} compiled in {seconds:.0f} s" for recipe, (_, seconds) in compiled.items()
             if seconds is not None]
    lines += ["", f"Artifacts: {cache}/{MODEL}-<recipe>-<source hash>"
              + (f" ({'; '.join(notes)})" if notes else " (reused from the cache)") + "."]
    lines.append(_load_note(quiet, args.quiet_cores))
    return "\n".join(lines), {"rows": rows, "load": quiet}


def _load_note(quiet: dict, threshold: float) -> str:
    verdict = ("all kept runs were quiet" if quiet["all_quiet"] else
               "**the machine never got quiet enough: the least disturbed runs were kept, treat the "
               "figures as pessimistic**")
    return (f"Background load: {quiet['rounds']} rounds run; other processes used {quiet['mean_other_cores']:.2f} "
            f"cores on average (at most {quiet['max_other_cores']:.2f}) during the kept runs, of "
            f"{os.cpu_count()} cores; a run is quiet below {threshold} cores: {verdict}.")


# ---------------------------------------------------------------------------------------------
# PART B: the W4 GEMV kernel
# ---------------------------------------------------------------------------------------------
def random_quantized(rng) -> tuple[np.ndarray, np.ndarray]:
    """Random int4 codes ``[K, N]`` (0..15) and scales ``[K / GROUP, N]``, k-major as lowbit keeps them."""
    codes = rng.integers(0, 16, size=(GEMV_K, GEMV_N), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(GEMV_K // GROUP, GEMV_N)).astype(np.float32)
    return codes, scales


def dequantized(codes, scales) -> np.ndarray:
    """``[K, N]`` float weights: ``(code - 8) * scale``."""
    return (codes.astype(np.float32) - 8.0) * np.repeat(scales, GROUP, axis=0)


class LowbitGemv:
    """``linear_kernel(int4 g128 sym, 1, N, K)`` scheduled by the host target's rules, weights packed
    as :mod:`lowbit.passes.schemes` packs them."""

    name = "lowbit"

    def __init__(self):
        import tvm

        from lowbit.codegen.formats import LinearFormat
        from lowbit.codegen.kernels import linear_kernel
        from lowbit.targets import get_target, schedule

        self.tvm = tvm
        self.chip = get_target("host")
        fmt = LinearFormat("int4", GROUP, False)
        layout = self.chip.linear_layout(fmt)
        self.tile = layout.tile
        sch = schedule(linear_kernel(fmt, layout, 1, GEMV_N, GEMV_K), self.chip)
        self.module = tvm.compile(sch.mod, target=self.chip.tvm()).jit()
        self.func = self.module["main"]
        self.device = tvm.cpu()
        self.copies = []
        self.y = tvm.runtime.tensor(np.zeros((1, GEMV_N), np.float32), self.device)

    def add_copy(self, codes, scales) -> int:
        from lowbit.codegen.packing import pack_int4, to_column_tiles

        w = to_column_tiles(pack_int4(codes), self.tile)
        s = to_column_tiles(scales, self.tile)
        self.copies.append((self.tvm.runtime.tensor(w, self.device), self.tvm.runtime.tensor(s, self.device)))
        return w.nbytes + s.nbytes

    def set_input(self, x):
        self.x = self.tvm.runtime.tensor(x, self.device)

    def call(self, i):
        w, s = self.copies[i]
        self.func(self.x, w, s, self.y)

    def output(self):
        return self.y.numpy()[0]


class OrtMatMulNBits:
    """One single-node ONNX model per weight copy: ``com.microsoft.MatMulNBits``, weights as
    initializers (ORT prepacks them at session creation), ``B`` in its ``[N, K/128, 64]`` layout.

    All the sessions share ORT's global intra-op pool of ``THREADS`` threads, as one session holding
    every weight would: with a pool per session, the idle pools' threads keep spinning after their
    turn and take the cores from the session running next (cold medians several times slower).
    """

    name = "ORT MatMulNBits"

    def __init__(self):
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state

        self.ort = ort
        self.sessions = []
        _pybind_state.set_global_thread_pool_sizes(THREADS, 1)  # intra-op, inter-op; before any session

    def _model(self, b, scales):
        from onnx import TensorProto, helper, numpy_helper

        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                                K=GEMV_K, N=GEMV_N, bits=4, block_size=GROUP, accuracy_level=4)
        graph = helper.make_graph(
            [node], "gemv",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, GEMV_K])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, GEMV_N])],
            initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("com.microsoft", 1)])

    def add_copy(self, codes, scales) -> int:
        # MatMulNBits: B[n, block, byte]; element k of a block sits in byte k // 2, low nibble first.
        # No zero_points input: the default zero point for 4 bits is 8, as lowbit's symmetric one.
        nk = np.ascontiguousarray(codes.T).reshape(GEMV_N, GEMV_K // GROUP, GROUP // 2, 2)
        b = (nk[..., 0] | (nk[..., 1] << 4)).astype(np.uint8)
        s = np.ascontiguousarray(scales.T).reshape(-1)  # [N * K/128], n-major
        options = self.ort.SessionOptions()
        options.use_per_session_threads = False  # the global pool: THREADS intra-op threads
        self.sessions.append(self.ort.InferenceSession(self._model(b, s).SerializeToString(), options,
                                                       providers=["CPUExecutionProvider"]))
        return b.nbytes + s.nbytes

    def set_input(self, x):
        self.feed = {"A": x}

    def call(self, i):
        self.out = self.sessions[i].run(None, self.feed)[0]

    def output(self):
        return self.out[0]


def time_calls(kernel, order) -> list[float]:
    times = []
    for i in order:
        start = time.perf_counter()
        kernel.call(i)
        times.append(time.perf_counter() - start)
    return times


def bandwidth_probes() -> dict:
    """Read-bandwidth probes over a 512 MB float32 array on ``THREADS`` threads; each call -> GB/s."""
    import tvm
    from tvm import s_tir, te

    from lowbit.targets import get_target

    nbytes = 512 << 20
    data = np.ones(nbytes // 4, np.float32)
    halves = np.array_split(data, THREADS)
    pool = ThreadPoolExecutor(THREADS)

    def numpy_sum():
        start = time.perf_counter()
        list(pool.map(np.sum, halves))  # numpy's reductions release the GIL
        return nbytes / (time.perf_counter() - start) / 1e9

    # a vectorized, parallel TVM reduction: 16 independent chunks, 32 float lanes each
    parts, lanes = 16, 32
    rows = nbytes // 4 // parts // lanes
    a = te.placeholder((parts, rows, lanes), "float32", name="A")
    r = te.reduce_axis((0, rows), name="r")
    out = te.compute((parts, lanes), lambda p, l: te.sum(a[p, r, l], axis=r), name="B")
    sch = s_tir.Schedule(te.create_prim_func([a, out]))
    block = sch.get_sblock("B")
    p, l, rr = sch.get_loops(block)
    sch.reorder(p, rr, l)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, p)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(l)
    sch.parallel(p)
    init = sch.decompose_reduction(block, rr)
    sch.vectorize(sch.get_loops(init)[-1])
    func = tvm.compile(sch.mod, target=get_target("host").tvm()).jit()["main"]
    dev = tvm.cpu()
    a_nd = tvm.runtime.tensor(data.reshape(parts, rows, lanes), dev)
    out_nd = tvm.runtime.tensor(np.zeros((parts, lanes), np.float32), dev)

    def tvm_sum():
        start = time.perf_counter()
        func(a_nd, out_nd)
        return nbytes / (time.perf_counter() - start) / 1e9

    numpy_sum(), tvm_sum()  # warm-up: page the array in
    return {"numpy sum": numpy_sum, "TVM vectorized sum": tvm_sum}


def part_b(args) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    kernels = [LowbitGemv(), OrtMatMulNBits()]
    first_codes, first_scales = random_quantized(rng)
    x = rng.standard_normal((1, GEMV_K), dtype=np.float32)
    reference = x[0] @ dequantized(first_codes, first_scales)

    copy_bytes = None
    target_bytes = max(COLD_BYTES, 8 * l3_bytes())
    copies = 0
    codes, scales = first_codes, first_scales
    while copies == 0 or copies * copy_bytes < target_bytes:
        if copies:
            codes, scales = random_quantized(rng)
        sizes = {k.add_copy(codes, scales) for k in kernels}
        assert len(sizes) == 1, f"weight bytes differ between kernels: {sizes}"
        copy_bytes = sizes.pop()
        copies += 1
    errors = {}
    for kernel in kernels:
        kernel.set_input(x)
        kernel.call(0)
        errors[kernel.name] = float(np.abs(kernel.output() - reference).max() / np.abs(reference).max())

    probes = bandwidth_probes()
    for kernel in kernels:  # warm-up: every copy once
        time_calls(kernel, range(copies))
    laps = max(1, args.gemv_calls // copies)

    def cold_block(kernel):
        return lambda: time_calls(kernel, list(range(copies)) * laps)

    def warm_block(kernel):
        def run():
            time_calls(kernel, [0] * 3)  # bring copy 0 into cache
            return time_calls(kernel, [0] * (copies * laps))
        return run

    tasks = dict(probes)
    for kernel in kernels:
        tasks[f"{kernel.name} cold"] = cold_block(kernel)
    for kernel in kernels:
        tasks[f"{kernel.name} warm"] = warm_block(kernel)
    runs, quiet = collect(tasks, args.gemv_rounds, args.max_wait, args.quiet_cores)
    bandwidth = {name: median(runs[name]) for name in probes}
    dram = max(bandwidth.values())
    cold = {k.name: sum(runs[f"{k.name} cold"], []) for k in kernels}
    warm = {k.name: sum(runs[f"{k.name} warm"], []) for k in kernels}

    summary = {k: {"cold_ms": median(v) * 1e3, "cold_min_ms": min(v) * 1e3} for k, v in cold.items()}
    for k, v in warm.items():
        summary[k] |= {"warm_ms": median(v) * 1e3, "warm_min_ms": min(v) * 1e3}
    bound_ms = copy_bytes / (dram * 1e9) * 1e3
    lines = [
        f"Y[1, {GEMV_N}] = X[1, {GEMV_K}] @ W, W int4 in groups of {GROUP} with fp32 scales (zero point 8): "
        f"{copy_bytes / 1e6:.1f} MB of codes + scales per copy, the same bytes in both layouts. "
        f"Cold: {copies} copies ({copies * copy_bytes / 1e6:.0f} MB, L3 is {l3_bytes() >> 20} MB) "
        f"called in turn; warm: copy 0 only. Medians (and min) of {len(cold[kernels[0].name])} calls per "
        f"kernel and mode, in {quiet['kept_per_task']} blocks of {copies * laps} taken in turn with the "
        f"other kernel, {THREADS} threads each.",
        "",
        f"| DRAM read probe (512 MB, {THREADS} threads) | GB/s (median of {quiet['kept_per_task']}) |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {rate:.1f} |" for name, rate in bandwidth.items()]
    lines += [
        "",
        f"Reference bandwidth: {dram:.1f} GB/s, so one cold pass over {copy_bytes / 1e6:.1f} MB takes at "
        f"least {bound_ms:.2f} ms.",
        "",
        "| kernel | cold ms (min) | cold weight GB/s | share of DRAM BW | x bandwidth bound "
        "| warm ms (min) | warm weight GB/s | max rel. error vs fp64 ref. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, fig in summary.items():
        cold_rate = copy_bytes / (fig["cold_ms"] / 1e3) / 1e9
        warm_rate = copy_bytes / (fig["warm_ms"] / 1e3) / 1e9
        fig |= {"cold_GBps": cold_rate, "warm_GBps": warm_rate, "cold_share_of_dram": cold_rate / dram,
                "max_rel_error": errors[name]}
        lines.append(
            f"| {name} | {fig['cold_ms']:.2f} ({fig['cold_min_ms']:.2f}) | {cold_rate:.1f} | "
            f"{cold_rate / dram:.0%} | {fig['cold_ms'] / bound_ms:.2f}x | {fig['warm_ms']:.2f} "
            f"({fig['warm_min_ms']:.2f}) | {warm_rate:.1f} | {errors[name]:.1e} |"
        )
    lb, ort_ = summary["lowbit"], summary["ORT MatMulNBits"]
    lines += [
        "",
        f"lowbit vs ORT (time ratio ORT / lowbit, >1 means lowbit is faster): cold "
        f"{ort_['cold_ms'] / lb['cold_ms']:.2f}x, warm {ort_['warm_ms'] / lb['warm_ms']:.2f}x. "
        "ORT's accuracy_level=4 quantizes X to int8 per block (hence its larger error); lowbit computes "
        "in fp32.",
        _load_note(quiet, args.quiet_cores),
    ]
    return "\n".join(lines), {"bandwidth_GBps": bandwidth, "copy_bytes": copy_bytes, "copies": copies,
                              "kernels": summary, "load": quiet}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def write_results(section: str) -> None:
    """Replace (or append) the section of RESULTS.md that ``section`` starts with (its ``## `` heading
    line), keeping everything else."""
    heading = section.split("\n", 1)[0]
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    RESULTS.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes once compiled)")
    parser.add_argument("--cache", default=str(BENCH_DIR / ".cache"), help="artifact cache folder")
    parser.add_argument("--rebuild", action="store_true", help="compile the artifacts even if cached")
    parser.add_argument("--only", choices=("a", "b"), help="run only part A or part B")
    parser.add_argument("--max-wait", type=float,
                        help="seconds per part to keep measuring while other processes disturb the runs "
                             "(default 120 with --quick, else 300)")
    parser.add_argument("--quiet-cores", type=float, default=0.25,
                        help="a run counts as undisturbed when other processes use fewer cores meanwhile")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    args.warmup = 1
    args.rounds_e2e = 3 if args.quick else 10
    args.gemv_rounds = 3 if args.quick else 7
    args.gemv_calls = 60 if args.quick else 150
    if args.max_wait is None:
        args.max_wait = 120.0 if args.quick else 300.0

    command = "python bench/bench_spine.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    started = time.perf_counter()
    header = [
        SECTION,
        "",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}. "
        f"Machine: {machine_description()}. {versions()}. {lowbit_revision()}.",
        "",
        f"Command: `{command}`",
    ]
    print("\n".join(header), flush=True)
    parts, raw = [], {}
    if args.only in (None, "a"):
        text, raw["part_a"] = part_a(args)
        parts.append(f"### Part A: end to end, SmolLM2-135M\n\n{text}")
        print("\n" + parts[-1], flush=True)
    if args.only in (None, "b"):
        text, raw["part_b"] = part_b(args)
        parts.append(f"### Part B: W4 decode GEMV, 1x{GEMV_K}x{GEMV_N} (M=1, K={GEMV_K}, N={GEMV_N})\n\n{text}")
        print("\n" + parts[-1], flush=True)
    footer = f"Whole run: {time.perf_counter() - started:.0f} s."
    print("\n" + footer)
    section = "\n".join(header) + "\n\n" + "\n\n".join(parts) + "\n\n" + footer + "\n"
    (BENCH_DIR / ".cache").mkdir(exist_ok=True)
    (BENCH_DIR / ".cache" / "last_spine.json").write_text(json.dumps(raw, indent=2, default=float) + "\n")
    if not args.no_write:
        write_results(section)
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
