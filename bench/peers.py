"""The peers' environment for the benchmarks: llama.cpp and ONNX Runtime GenAI, never lowbit's deps.

``ensure()`` installs, once, into ``bench/.cache/peers`` (a ``pip --target`` folder that peer
processes put first on ``PYTHONPATH``, so they share lowbit's venv for torch, transformers and numpy):

* ``llama-cpp-python==0.3.36`` built from its PyPI sdist with native CPU flags (about 12 minutes on
  2 cores). AMX is turned off: llama.cpp's AMX matmul dies with SIGILL on OpenMP worker threads on
  Linux (no ``ARCH_REQ_XCOMP_PERM`` request), AVX-512 and VNNI stay on.
* ``onnxruntime-genai==0.18.0`` and ``onnx-ir`` (its model builder);
* ``matplotlib``, for ``bench/plot_results.py``, in a folder of its own (``bench/.cache/plot``: it
  brings its own numpy, which must not shadow lowbit's in the peer processes).

and converts the peers' models from lowbit's own cached fp32 Hugging Face folder of SmolLM2-135M
(the same weights lowbit compiles): GGUF F32 with llama.cpp's ``convert_hf_to_gguf.py`` (from the
sdist), then Q8_0 and Q4_0 with llama.cpp's quantizer; ORT GenAI int4 (block 128 and 32, accuracy
level 4) and fp32 with its builder, offline. Both tools need ``architectures`` in config.json, which
the GGUF-converted folder lacks: they read a copy that has it.

    python bench/peers.py          # install and convert (idempotent)
"""

from __future__ import annotations

import no_shadowing  # noqa: F401  (first: bench/kernels.py must not pass for the kernels package)

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
PEERS = CACHE / "peers"  # pip --target folder
MODELS = CACHE / "peer-models"
LLAMA_CPP = "llama-cpp-python==0.3.36"
ORT_GENAI = ("onnxruntime-genai==0.18.0", "onnx-ir")
PLOT = CACHE / "plot"  # pip --target folder of matplotlib (with its own numpy), for bench/plot_results.py
PLOTTING = "matplotlib==3.10.8"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def env() -> dict:
    """The environment a peer process runs in: the peers first on ``PYTHONPATH``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PEERS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _pip(*args: str, extra_env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(PEERS), *args], check=True,
                   env={**os.environ, **(extra_env or {})})


def install() -> None:
    if not (PEERS / "sentencepiece").is_dir():  # convert_hf_to_gguf.py imports it before it tries BPE
        _pip("--no-deps", "sentencepiece")
    if not (PEERS / "llama_cpp").is_dir():
        print("building llama-cpp-python from its sdist (about 12 minutes on 2 cores)", flush=True)
        flags = f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"
        _pip("--no-deps", "--no-binary", "llama-cpp-python", LLAMA_CPP,
             extra_env={"CMAKE_ARGS": flags, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
        _pip("--no-deps", "diskcache", "jinja2")
    if not (PEERS / "onnxruntime_genai").is_dir():
        _pip("--no-deps", *ORT_GENAI)
    if not (PLOT / "matplotlib").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(PLOT), PLOTTING], check=True)


def hf_folder() -> Path:
    """lowbit's cached fp32 SmolLM2 folder, copied with ``architectures`` in its config.json."""
    from lowbit.compiler.sources.models import resolve_model

    source = resolve_model("smollm2-135m").folder
    folder = MODELS / "smollm2-135m-hf"
    if not (folder / "config.json").is_file():
        staged = MODELS / ".hf.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
        config = json.loads((staged / "config.json").read_text())
        config.setdefault("architectures", ["LlamaForCausalLM"])
        (staged / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(staged, folder)
    return folder


def gguf_models() -> dict[str, Path]:
    """``{"f32": ..., "q8_0": ..., "q4_0": ...}`` GGUF files of the same weights."""
    folder = hf_folder()
    f32 = MODELS / "smollm2-135m-f32.gguf"
    if not f32.is_file():
        script = _llama_cpp_script()
        subprocess.run([sys.executable, str(script), str(folder), "--outtype", "f32", "--outfile", str(f32)],
                       check=True, env=env(), stdout=subprocess.DEVNULL)
    files = {"f32": f32}
    for kind, ftype in (("q8_0", 7), ("q4_0", 2)):  # llama_ftype: MOSTLY_Q8_0 = 7, MOSTLY_Q4_0 = 2
        path = MODELS / f"smollm2-135m-{kind}.gguf"
        if not path.is_file():
            code = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                    f"p.ftype = {ftype}; p.nthread = 2; "
                    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
            subprocess.run([sys.executable, "-c", code, str(f32), str(path)], check=True, env=env())
        files[kind] = path
    return files


def _llama_cpp_script() -> Path:
    """``convert_hf_to_gguf.py`` from the llama-cpp-python sdist (cached)."""
    script = MODELS / "llama.cpp" / "convert_hf_to_gguf.py"
    if (MODELS / "llama.cpp" / "conversion").is_dir():
        return script
    MODELS.mkdir(parents=True, exist_ok=True)
    download = MODELS / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    LLAMA_CPP, "-d", str(download)], check=True)
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        root = tar.getnames()[0].split("/")[0]
        base = f"{root}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(base)
                   and (m.name == base + "convert_hf_to_gguf.py" or m.name.startswith((base + "gguf-py/", base + "conversion/")))]
        tar.extractall(MODELS / "sdist-files", members=members, filter="data")
    source = MODELS / "sdist-files" / root / "vendor" / "llama.cpp"
    shutil.rmtree(MODELS / "llama.cpp", ignore_errors=True)
    shutil.copytree(source, MODELS / "llama.cpp")
    return script


def ort_genai_models() -> dict[str, Path]:
    """ORT GenAI model folders: ``int4-b128``, ``int4-b32`` (accuracy level 4) and ``fp32``."""
    folder = hf_folder()
    out = {}
    for name, precision, extra in (("int4-b128", "int4", ["int4_block_size=128", "int4_accuracy_level=4"]),
                                   ("int4-b32", "int4", ["int4_block_size=32", "int4_accuracy_level=4"]),
                                   ("fp32", "fp32", [])):
        target = MODELS / f"ort-genai-{name}"
        if not (target / "genai_config.json").is_file():
            staged = MODELS / f".ort-genai-{name}.tmp"
            shutil.rmtree(staged, ignore_errors=True)
            command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(staged),
                       "-p", precision, "-e", "cpu", "-c", str(MODELS / "ort-genai-cache")]
            if extra:
                command += ["--extra_options", *extra]
            subprocess.run(command, check=True, env=env(), stdout=subprocess.DEVNULL)
            os.replace(staged, target)
        out[name] = target
    return out


def ensure() -> tuple[dict, dict]:
    install()
    return gguf_models(), ort_genai_models()


if __name__ == "__main__":
    ggufs, ort_models = ensure()
    for name, path in {**ggufs, **ort_models}.items():
        print(f"{name}: {path}")
