"""A script's start-up (issue 29's fixed cost of a run): run as a command it imports with the cyclic GC off, then
`utils.errors.user_entry_point` freezes the objects the imports made and turns the GC back on before the run.
The GC had scanned those objects in 8 full collections during the imports (docs/PERFORMANCE.md, "Fixed cost of a
run"); imported as a module (tests, other scripts) a script leaves the GC alone."""

import gc
import importlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = ["train_text_to_image", "train_mask_dit", "train_segmentation_tpu", "generate", "train_controlnet"]

PROBE = """
import atexit, gc, json, runpy, sys
atexit.register(lambda: print("GC " + json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                                                   "full_collections": gc.get_stats()[2]["collections"]})))
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_a_command_imports_without_the_cyclic_gc_then_runs_with_it(script_name):
    result = subprocess.run([sys.executable, "-c", PROBE, os.path.join(REPO_ROOT, script_name + ".py")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    state = json.loads(result.stdout.rsplit("GC ", 1)[1])
    assert state["enabled"], "the GC stays off after the start-up"
    assert state["full_collections"] == 0, f"the GC scanned everything during the start-up: {state}"
    assert state["frozen"] > 100_000, f"the imports' objects were not frozen: {state}"


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_importing_a_script_leaves_the_gc_alone(script_name):
    importlib.import_module(script_name)
    assert gc.isenabled()
