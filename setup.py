import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INSTALL_HINT = "install with `pip install --no-build-isolation -e .` inside an environment that has torch"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    sys.exit(f"pagedlm: building the pagedlm._C extension needs torch ({exc}); {INSTALL_HINT}")

# Everything needed to use AVX-512 through ATen's Vectorized<float> (vec512 needs DQ); x86
# /proc/cpuinfo spells the flags without the dash.
AVX512_FLAGS = {
    "-mavx512f": "avx512f",
    "-mavx512bw": "avx512bw",
    "-mavx512vl": "avx512vl",
    "-mavx512dq": "avx512dq",
    "-mfma": "fma",
}

# vdpbf16ps and the BF16 conversions (Cooper Lake, Sapphire Rapids, Zen 4 and later): the bf16 linears
# in oneDNN's order and the bf16 attention tiles.
AVX512_BF16_FLAGS = {"-mavx512bf16": "avx512_bf16"}

# Without AVX-512: 256-bit vectors for ATen's Vectorized<float> and the FMA linear (Haswell, Zen 1-3).
AVX2_FLAGS = {"-mavx2": "avx2", "-mfma": "fma", "-mf16c": "f16c"}

# The tile instructions of csrc/cpu/amx_linear.cpp and amx_attention.h (Sapphire Rapids and later).
AMX_FLAGS = {"-mamx-tile": "amx_tile", "-mamx-bf16": "amx_bf16"}


def cxx() -> str:
    return os.environ.get("CXX", "c++")


def compiler_accepts(flags: list[str]) -> bool:
    try:
        probe = subprocess.run([cxx(), *flags, "-x", "c++", "-fsyntax-only", "-"], input=b"int main() {}",
                               capture_output=True)
    except OSError:
        return False
    return probe.returncode == 0


def cpu_arch_flags() -> list[str]:
    """The widest of AVX-512 (plus BF16's, then AMX's, where this CPU has them) and AVX2 that both this
    CPU and the compiler support; PAGEDLM_CPU_ARCH_FLAGS overrides."""
    if "PAGEDLM_CPU_ARCH_FLAGS" in os.environ:
        return os.environ["PAGEDLM_CPU_ARCH_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        cpu_flags = set()
    flags: list[str] = []
    for tier in (AVX512_FLAGS, AVX512_BF16_FLAGS, AMX_FLAGS):
        if not (cpu_flags.issuperset(tier.values()) and compiler_accepts([*flags, *tier])):
            break
        flags += tier
    if flags:
        return flags
    if cpu_flags.issuperset(AVX2_FLAGS.values()) and compiler_accepts(list(AVX2_FLAGS)):
        print("pagedlm: AVX-512 (f/bw/vl/dq) not available on this CPU or compiler; building AVX2 kernels")
        return list(AVX2_FLAGS)
    print("pagedlm: neither AVX-512 (f/bw/vl/dq) nor AVX2 available on this CPU or compiler; building portable kernels")
    return []


def missing_prerequisites(with_cuda: bool) -> list[str]:
    missing = []
    if shutil.which(cxx()) is None:
        missing.append(f"a C++ compiler (`{cxx()}` not found; set CXX or install g++)")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        missing.append("the Python development headers (Python.h; e.g. python3-dev)")
    if with_cuda and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        missing.append(f"nvcc under CUDA_HOME={CUDA_HOME}")
    return missing


class BuildPagedlmExtension(BuildExtension):
    def run(self):
        missing = missing_prerequisites(WITH_CUDA)
        if missing:
            sys.exit("pagedlm: cannot build pagedlm._C; missing: " + "; ".join(missing))
        try:
            super().run()
        except Exception:
            print(f"pagedlm: building pagedlm._C failed (compiler output above); {INSTALL_HINT}", file=sys.stderr)
            raise


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None
if torch.version.cuda is not None and CUDA_HOME is None:
    print("pagedlm: torch has CUDA but CUDA_HOME is not set (no nvcc found); building the CPU kernels only")

# Warnings we cannot act on: torch >= 2.10 headers use C++20 bit-field initialisers (accepted by
# GCC in C++17 mode, which our sources are) and clang/nvcc pragmas, and GCC 12 misreports the
# _mm512_undefined_* idiom inside its own AVX-512 headers as uninitialised.
QUIET = ["-Wno-c++20-extensions", "-Wno-unknown-pragmas", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
# -ffp-contract=off: the layer kernels reproduce eager torch's separately rounded multiplies and adds.
# -falign-functions=64: otherwise the decode kernel's speed moves by up to 20% with where the linker
# happens to place its (unchanged) code after an edit anywhere in the extension.
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-falign-functions=64", *QUIET, *cpu_arch_flags()]
ext_sources = sources("csrc/torch_bindings.cpp") + sources("csrc/op_program.cpp") + sources("csrc/cpu/*.cpp")
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extension = CUDAExtension(
        "pagedlm._C",
        ext_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension("pagedlm._C", ext_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])

setup(
    name="pagedlm",
    version="0.1.0",
    description="Offline batch inference for LLMs with a paged KV cache and continuous batching",
    packages=find_packages(include=["pagedlm", "pagedlm.*"]),
    python_requires=">=3.11",  # the oldest Python the tests run on (typing.NotRequired, hashlib.file_digest)
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "numpy",
        "tqdm",
        "gguf>=0.10",
        "accelerate",  # transformers reads non-Llama GGUF files only with it
        "jinja2>=3.1",  # transformers renders chat templates with it
    ],
    extras_require={
        "parquet": ["pyarrow>=14"],  # to_pylist(maps_as_pydicts=...), unify_schemas(promote_options=...)
        "ray": ["ray[data]"],
        "structured": ["xgrammar"],
        "test": ["pytest", "hypothesis", "pyarrow", "nbclient", "ipykernel", "matplotlib", "ray[data]", "xgrammar",
                 "jsonschema", "moto[server]"],
    },
    entry_points={"console_scripts": ["pagedlm=pagedlm.entrypoints.cli:main"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildPagedlmExtension},
)
