"""Builds transfer_fast._C: CPU kernels always, CUDA kernels when they can be built.

Switches (environment):
  TRANSFER_FAST_CUDA=1 / 0    force the CUDA sources in (e.g. a build host without a
                              GPU) or leave them out; default: when torch has CUDA and
                              nvcc is found.
  TORCH_CUDA_ARCH_LIST        CUDA architectures, default "8.0;9.0".
  TRANSFER_FAST_CPU_ISA       "avx2" or "generic"; default: what the build host supports.
  CXX / CC                    the compilers; prefer the distribution's (CXX=g++ CC=gcc):
                              a wrapper script can break C++ exceptions, and then every
                              error inside a kernel kills the process (a segfault).
The decisions (compilers included) are printed first and written to
transfer_fast/_build_info.json, which `transfer-fast info` reports; a compiler that
does not look like the system's is warned about again after the build.
"""

import glob
import json
import os
import shutil
import subprocess
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# at::vec::Vectorized only uses SIMD registers when the translation unit is
# compiled for that instruction set; without it the kernels run ~3x slower.
CPU_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "generic": [],
}


def cuda_decision() -> tuple[bool, str]:
    switch = os.environ.get("TRANSFER_FAST_CUDA", "auto").lower()
    if switch in ("1", "force", "on"):
        return True, "forced by TRANSFER_FAST_CUDA"
    if switch in ("0", "off"):
        return False, "disabled by TRANSFER_FAST_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc not found (CUDA_HOME unset)"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def cpu_isa_decision() -> tuple[str, str]:
    forced = os.environ.get("TRANSFER_FAST_CPU_ISA")
    if forced:
        if forced not in CPU_ISA_FLAGS:
            raise SystemExit(f"TRANSFER_FAST_CPU_ISA={forced!r}: expected one of "
                             f"{list(CPU_ISA_FLAGS)}")
        return forced, "set by TRANSFER_FAST_CPU_ISA"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2", "the build host has AVX2, FMA and F16C"
    return "generic", "the build host lacks AVX2/FMA/F16C"


def compiler_decision() -> dict:
    """For CXX and CC: the command the build uses, its resolved path and version, and
    whether it looks like the system compiler (a binary under /usr/bin or /bin, not a
    script)."""
    found = {}
    # What torch's BuildExtension runs: $CXX or c++ for C++ (the linker too), and the
    # interpreter's configured C compiler unless $CC is set.
    for var, default in (("CXX", "c++"), ("CC", sysconfig.get_config_var("CC") or "cc")):
        command = os.environ.get(var) or default
        exe = shutil.which(command.split()[0]) if command.split() else None
        real = os.path.realpath(exe) if exe else None
        try:
            with open(real, "rb") as f:
                script = f.read(2) == b"#!"
            out = subprocess.run([real, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
            version = (out.splitlines() or ["?"])[0]
        except (OSError, TypeError, subprocess.SubprocessError):
            script, version = False, "unknown"
        system = bool(real) and not script and real.startswith(("/usr/bin/", "/bin/"))
        found[var] = {"command": command, "path": real, "version": version, "system": system}
    return found


def compiler_warnings(compilers: dict) -> list:
    return [f"{var}={c['command']} ({c['path'] or 'not found'}) is not the system compiler; "
            "a wrapper can break C++ exceptions, turning every kernel error into a crash. "
            "`transfer-fast info` checks it; if it reports a problem, rebuild with "
            "CXX=g++ CC=gcc" for var, c in compilers.items() if not c["system"]]


COMPILERS = compiler_decision()


class BuildExtensionChecked(BuildExtension):
    """BuildExtension that repeats the compiler warning after the build's long log."""

    def run(self):
        super().run()
        for warning in compiler_warnings(COMPILERS):
            print(f"warning: {warning}")


def extension():
    with_cuda, cuda_why = cuda_decision()
    cpu_isa, isa_why = cpu_isa_decision()
    sources = ["csrc/transfer_fast.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # OpenMP makes at::parallel_for parallel; torch ships the libgomp it uses.
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000", *CPU_ISA_FLAGS[cpu_isa]]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                  py_limited_api=True)
    archs = None
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension("transfer_fast._C", sources, **kwargs)
    else:
        ext = CppExtension("transfer_fast._C", sources, **kwargs)
    info = {"torch": torch.__version__, "cpu_isa": cpu_isa, "cuda": with_cuda,
            "cuda_archs": archs, "cuda_reason": cuda_why, "compilers": COMPILERS}
    print("transfer_fast build configuration:")
    print(f"  torch        {torch.__version__}")
    for var, c in COMPILERS.items():
        mark = "" if c["system"] else "  (not the system compiler: see the warning below)"
        print(f"  {var:<12} {c['command']} -> {c['path']}, {c['version']}{mark}")
    print(f"  CPU kernels  yes, {cpu_isa} vectors ({isa_why})")
    print(f"  CUDA kernels {'yes, archs ' + archs if with_cuda else 'no'} ({cuda_why})")
    with open(os.path.join("transfer_fast", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return ext


# Shipped in the wheel beside the code: the PEP 561 marker for type checkers, and the
# build record `transfer-fast info` reports (written by extension() above, so before
# build_py copies the package).
PACKAGE_DATA = {"transfer_fast": ["py.typed", "_build_info.json"]}

setup(
    ext_modules=[extension()],
    package_data=PACKAGE_DATA,
    cmdclass={"build_ext": BuildExtensionChecked},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
