"""Shared test helpers, and caches of the test session's own."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# The whole test run (and every process it starts) keeps its Hugging Face caches in a temporary folder, never the
# user's ~/.cache/huggingface: a 2-image test set named `camvid` cached there was once served to every later
# non-streamed load of the real CamVid folder. Set here, at conftest import, before any test module imports
# datasets, huggingface_hub or transformers, which read these variables when imported.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="native_seg_hf_tests_"))
os.environ["HF_HOME"] = str(SESSION_CACHE / "hf_home")
os.environ["HF_HUB_CACHE"] = str(SESSION_CACHE / "hf_home" / "hub")
os.environ["HF_DATASETS_CACHE"] = str(SESSION_CACHE / "hf_datasets")
os.environ["HF_MODULES_CACHE"] = str(SESSION_CACHE / "hf_home" / "modules")
# Other libraries' caches too: ONNX Runtime keeps a device id and a database in $XDG_CACHE_HOME (default ~/.cache)
# under Microsoft/DeveloperTools whenever a session is created.
os.environ["XDG_CACHE_HOME"] = str(SESSION_CACHE / "xdg_cache")


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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
