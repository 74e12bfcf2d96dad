"""Shared test helpers."""

import os
import subprocess
import sys
import textwrap

import pytest

# Prepended to a script so that it runs as a user without this package would: any import of native_seg_hf
# fails, so whatever loads must come from the remote code saved next to the weights.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "native_seg_hf":
                raise ImportError("native_seg_hf is blocked in this process")
    sys.meta_path.insert(0, _BlockPackage())
    """
)


@pytest.fixture
def run_without_package(tmp_path):
    """Run a Python script (with arguments) in a fresh process where native_seg_hf cannot be imported, offline,
    with its own remote-code module cache; fail the test with the script's stderr if it fails."""

    def run(script: str, *args) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
        result = subprocess.run(
            [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(script), *map(str, args)],
            capture_output=True, text=True, cwd=tmp_path, env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run
