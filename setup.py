"""Build glue: setuptools drives CMake (CMakeLists.txt holds the one description of the library).

Everything a build can be told comes through environment variables, read here and handed to CMake:
  MOEYARD_CPU_ONLY=1       build only the CPU kernels, even with a CUDA torch and nvcc present
  TORCH_CUDA_ARCH_LIST     e.g. "9.0a" or "8.0;9.0a"; default: the visible GPU, else "8.0;9.0a"
  MAX_JOBS                 parallel compile jobs (default: all cores)
  NVCC_THREADS             nvcc --threads per job (default 1)
  MOEYARD_BUILD_DIR        CMake build tree, kept between builds for ninja/ccache (default build/cmake)
CUDA sources are compiled when torch is a CUDA build and nvcc is found; never decided by whether a
GPU is visible, so GPU-less builders produce the same library as GPU machines.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_home():
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    return home if nvcc is not None and nvcc.exists() else None


def _default_arch_list():
    import torch

    if torch.cuda.is_available():  # only to pick a default: the visible GPU
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}" + ("a" if major == 9 else "")
    return "8.0;9.0a"


def _gencode_flags(arch_list):
    """'8.0;9.0a' -> -gencode flags, machine code (no PTX) for each architecture."""
    flags, archs = [], []
    for a in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.removesuffix("+PTX")
        num = a.replace(".", "")
        archs.append(a)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags, archs


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        from torch.utils import cpp_extension

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(os.environ.get("MOEYARD_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)

        cuda_home = None if os.environ.get("MOEYARD_CPU_ONLY") == "1" else _cuda_home()
        with_cuda = torch.version.cuda is not None and cuda_home is not None
        archs = []
        args = [
            f"-DMOEYARD_OUTPUT={out}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={cpp_extension.library_paths()[0]}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMOEYARD_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if with_cuda:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_arch_list()
            gencode, archs = _gencode_flags(arch_list)
            args += [
                f"-DCMAKE_CUDA_COMPILER={Path(cuda_home, 'bin', 'nvcc')}",
                f"-DMOEYARD_GENCODE={';'.join(gencode)}",
                f"-DMOEYARD_NVCC_THREADS={os.environ.get('NVCC_THREADS', '1')}",
                f"-DMOEYARD_CUDA_ARCHS={' '.join(archs)}",
            ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        print(f"moeyard: CUDA kernels {'ON for ' + ';'.join(archs) if with_cuda else 'OFF'}", flush=True)

        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])



setup(
    ext_modules=[Extension("moeyard._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
