"""What the tests of r1c's CPU kernels (r1c/plugins/cpu_moe) share: the library compiled once per session for every
x86-64 level (`kernels`), the one a bundle would load here (`kernel`), and each level this CPU runs (`any_level`).

Without a compiler or ONNX Runtime's headers the tests skip saying so, except under CI (CI=true), where `.ci/run`
fetches the headers and a skip would hide a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from r1c.plugins.cpu_moe import library as cpu_library


@pytest.fixture(scope="session")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The library compiled for every level (into a temporary `kernels/`): level -> path."""
    why = cpu_library.why_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must build r1c's CPU kernels (.ci/run fetches the headers): {why}")
        pytest.skip(f"r1c's CPU kernels cannot be built here: {why}")
    dest = tmp_path_factory.mktemp("kernels")
    files = cpu_library.copy_libraries(cpu_library.compile_libraries(), dest)
    return {level: dest / name for level, name in files.items()}


@pytest.fixture(scope="session")
def kernel(kernels: dict[str, Path]) -> Path:
    """The library a bundle would load on this host (its highest level)."""
    names = {level: path.name for level, path in kernels.items()}
    return next(iter(kernels.values())).with_name(cpu_library.for_host(names))


@pytest.fixture(params=list(cpu_library.LEVELS))
def any_level(request: pytest.FixtureRequest, kernels: dict[str, Path]) -> Path:
    """Each level's library that this CPU can run (an AVX-512 host runs the AVX2 build too)."""
    level = request.param
    if not cpu_library.LEVELS[level][1] <= cpu_library.host_flags():
        pytest.skip(f"this CPU lacks {level}'s flags {sorted(cpu_library.LEVELS[level][1] - cpu_library.host_flags())}")
    return kernels[level]
