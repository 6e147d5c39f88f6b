"""Builds flux_engine (+ flux_engine.triton_kernels from ./triton_kernels) and the extension flux_engine._C.

The C++ CPU kernels are always built. The CUDA kernels are added when the installed torch has CUDA and
nvcc is found (CUDA_HOME); ``FLUX_ENGINE_NO_CUDA=1`` skips them. Build with ``--no-build-isolation`` so the
extension compiles against the torch already installed instead of a freshly downloaded one.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _with_cuda() -> bool:
    if os.environ.get("FLUX_ENGINE_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = _sources("csrc/cpu/*.cpp") + _sources("csrc/torch/ops_cpu.cpp") + ["csrc/bindings.cpp"]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if _with_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/torch/ops_cuda.cpp")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "flux_engine._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FLUX_ENGINE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "flux_engine._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["flux_engine", "flux_engine.*"]) + ["flux_engine.triton_kernels"],
    package_dir={"flux_engine.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
