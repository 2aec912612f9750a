"""Packaging. `kernels/` ships as the subpackage `rerule.kernels`.

The CUDA backend (kernels/csrc) is built by CMake only when RERULE_BUILD_CUDA=1;
a default install never runs a compiler.
"""

import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


class BuildPyWithCuda(build_py):
    def run(self):
        if os.environ.get("RERULE_BUILD_CUDA") == "1":
            build_dir = ROOT / "build"
            # writes kernels/lib/librerule_cuda.so (RERULE_CUDA_LIB_DIR), which package_data then ships
            subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DRERULE_BUILD_CUDA=ON"])
            subprocess.check_call(["cmake", "--build", str(build_dir), "-j"])
        super().run()


packages = find_packages(include=["rerule", "rerule.*"])
kernel_packages = ["rerule.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
package_dir = {"rerule": "rerule"}
package_dir.update({p: "kernels" + p[len("rerule.kernels"):].replace(".", "/") for p in kernel_packages})

setup(
    packages=packages + kernel_packages,
    package_dir=package_dir,
    package_data={"rerule": ["configs/*.yaml", "data/fixtures/**/*"], "rerule.kernels": ["csrc/*", "lib/*.so"]},
    cmdclass={"build_py": BuildPyWithCuda},
)
