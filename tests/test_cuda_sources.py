"""The CUDA bindings (csrc/cuda/bindings.cpp) against torch's headers and the launchers' signatures,
without a GPU or a CUDA build of torch: a syntax-only compile where the CUDA toolkit's headers are
installed (CI compiles the kernels themselves with nvcc in .ci/compile_cuda.sh)."""

import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include() -> str | None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"),
                  "/usr/local/cuda/include"]
    candidates += sorted((os.path.join("/usr/local", d, "include") for d in os.listdir("/usr/local")
                          if d.startswith("cuda-")), reverse=True)
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "cuda_runtime.h"))), None)


def test_cuda_bindings_compile(tmp_path):
    cuda_include = _cuda_include()
    if cuda_include is None or shutil.which("g++") is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime.h) or g++ here")
    # A CPU wheel of torch ships c10/cuda's headers but not the one its CMake build generates.
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
           f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}", os.path.join(ROOT, "csrc/cuda/bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
