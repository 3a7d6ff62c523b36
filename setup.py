"""Build of nestedfn's native step (``nestedfn.fast._native``, ``CMakeLists.txt``).

MLX's route for custom primitives (``mlx.extension.CMakeBuild``: CMake + nanobind, against
the MLX pinned in ``[build-system] requires``).  Optional: on macOS (no Metal eval),
with ``NESTEDFN_NATIVE_BUILD=0`` or when the build fails, nestedfn installs without it and
``compile_step`` runs the pure-MLX step.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

ext_modules: list = []
cmdclass: dict = {}
WANT = os.environ.get("NESTEDFN_NATIVE_BUILD", "1") != "0" and sys.platform.startswith("linux")

if WANT:
    try:
        from mlx import extension
    except ImportError as e:  # not in the build environment: install without the native step
        print(f"nestedfn: not building the native step ({e})", file=sys.stderr)
    else:

        class OptionalCMakeBuild(extension.CMakeBuild):
            """``CMakeBuild`` that warns instead of failing the install."""

            def run(self) -> None:
                try:
                    super().run()
                except Exception as e:  # noqa: BLE001 - any build failure: pure-MLX fallback
                    print(
                        f"nestedfn: the native step was not built ({type(e).__name__}: {e}); "
                        "compile_step will use the pure-MLX path",
                        file=sys.stderr,
                    )

        ext_modules = [extension.CMakeExtension("nestedfn.fast._native", sourcedir=".")]
        cmdclass = {"build_ext": OptionalCMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
