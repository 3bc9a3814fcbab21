"""A map that cannot go stale: every module is in docs/LAYOUT.md, every flag a script accepts is read by the code
that script runs, each trainer's main() stays within 100 lines, and utils/ and the scripts import without a cycle
(issue 29: `--offload_ema` was accepted by three trainers and read by one; the README's map missed 8 modules)."""

import argparse
import ast
import glob
import importlib
import os
import re

import pytest

from tests.conftest import REPO_ROOT

TRAINERS = ["train_text_to_image", "train_mask_dit", "train_segmentation_tpu"]
MINIMAL_ARGV = {"train_text_to_image": ["--train_data_dir", "x", "--model_preset", "tiny"],
                "train_mask_dit": ["--train_data_dir", "x"], "train_segmentation_tpu": ["--dataset_dir", "x"],
                "generate": ["--model", "x", "--prompt", "p"],
                "train_controlnet": ["--pretrained_model_name_or_path", "p", "--dataset_name", "d"]}


def repo_path(*parts):
    return os.path.join(REPO_ROOT, *parts)


def module_file(name: str) -> str | None:
    base = repo_path(*name.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def imported_files(path: str) -> set[str]:
    """The repository's modules `path` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {f for f in map(module_file, names) if f is not None}
    return found - {path, repo_path("utils", "__init__.py")}


def import_closure(path: str) -> set[str]:
    seen, stack = set(), [path]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack += imported_files(current)
    return seen


def test_every_module_is_in_the_layout_map():
    layout = open(repo_path("docs", "LAYOUT.md"), encoding="utf-8").read()
    modules = sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(repo_path("utils", "**", "*.py"), recursive=True)
                     if not p.endswith("__init__.py"))
    missing = [m for m in modules if f"| `{m}` |" not in layout]
    assert not missing, f"docs/LAYOUT.md has no row for {missing}"
    listed = re.findall(r"^\| `(utils/[^`]+\.py)` \|", layout, re.M)
    assert not set(listed) - set(modules), f"docs/LAYOUT.md lists modules that do not exist: {set(listed) - set(modules)}"


@pytest.mark.parametrize("script_name", [*TRAINERS, "train_controlnet", "generate"])
def test_every_accepted_flag_is_read_by_the_code_the_script_runs(script_name):
    """A flag's dest must be read (`args.x`, `getattr(args, "x"`; `known.config`: utils/config.py's pre-parser) in
    the script or a module it imports."""
    script = importlib.import_module(script_name)
    dests, original = set(), argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        dests.update(action.dest for action in self._actions if action.option_strings and action.dest != "help")
        return original(self, args, namespace)
    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args(MINIMAL_ARGV[script_name])
    finally:
        argparse.ArgumentParser.parse_args = original
    files = import_closure(repo_path(script_name + ".py"))
    code = "\n".join(open(f, encoding="utf-8").read() for f in files)
    typed = typed_config_fields(files)  # a flag read into a typed config counts where its field is read

    def read(d):
        return re.search(rf"(args|known)\.{d}\b|getattr\(args, \"{d}\"", code) or (
            d in typed and re.search(rf"\b(?!args\b)[a-z_]+\.{d}\b", code))
    unread = sorted(d for d in dests if not read(d))
    assert len(dests) > 20 and not unread, f"{script_name} accepts but never reads: {unread}"


def typed_config_fields(files) -> set[str]:
    """The fields of the dataclasses with a `from_args` (typed configs built from the flags of the same names)."""
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name == "from_args"
                                                      for f in node.body):
                found |= {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    return found


@pytest.mark.parametrize("script_name", TRAINERS)
def test_main_reads_on_one_screen(script_name):
    tree = ast.parse(open(repo_path(script_name + ".py"), encoding="utf-8").read())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 100, f"{script_name}.main() is {main.end_lineno - main.lineno + 1} lines"


def test_no_import_cycles():
    files = sorted(glob.glob(repo_path("utils", "**", "*.py"), recursive=True)) + sorted(glob.glob(repo_path("*.py")))
    graph = {f: imported_files(f) for f in files}
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for successor in graph.get(node, ()):
            if state.get(successor) == 1:
                cycle = path[path.index(successor):] + [successor]
                raise AssertionError("import cycle: " + " -> ".join(os.path.relpath(p, REPO_ROOT) for p in cycle))
            if successor not in state:
                visit(successor, path + [successor])
        state[node] = 2

    for f in files:
        if f not in state:
            visit(f, [f])


@pytest.mark.parametrize("script_name", TRAINERS)
def test_trainer_files_stay_short(script_name):
    """Issue 29: each trainer file <= 450 lines (what they share lives in utils/)."""
    lines = len(open(repo_path(script_name + ".py"), encoding="utf-8").read().splitlines())
    assert lines <= 450, f"{script_name}.py is {lines} lines"


def _functions_taking_args():
    """(module, function, flags read, flags written) for every utils function with a parameter named `args`."""
    for path in sorted(glob.glob(repo_path("utils", "**", "*.py"), recursive=True)):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if "args" not in [a.arg for a in node.args.args + node.args.kwonlyargs]:
                continue
            read, written = set(), set()
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "args":
                    (written if isinstance(sub.ctx, ast.Store) else read).add(sub.attr)
                elif isinstance(sub, ast.Call) and sub.args and isinstance(sub.args[0], ast.Name) \
                        and sub.args[0].id == "args":
                    name = sub.func.id if isinstance(sub.func, ast.Name) else None
                    flag = sub.args[1].value if len(sub.args) > 1 and isinstance(sub.args[1], ast.Constant) else "?"
                    if name == "getattr":
                        read.add(flag)
                    elif name in ("setattr", "delattr"):
                        written.add(flag)
                    elif name == "vars" and isinstance(getattr(sub, "parent", None), ast.Attribute):
                        written.add("vars(args)")
            for sub in ast.walk(node):  # vars(args).update(...) / vars(args)[...] = ...
                if isinstance(sub, ast.Attribute) and sub.attr in ("update", "__setitem__", "setdefault") \
                        and isinstance(sub.value, ast.Call) and isinstance(sub.value.func, ast.Name) \
                        and sub.value.func.id == "vars":
                    written.add("vars(args)")
            yield os.path.relpath(path, REPO_ROOT), node.name, read, written


def test_no_utils_function_reads_more_than_eight_flags():
    """Issue 29: shared code takes explicit parameters or a small typed config, not the whole namespace."""
    heavy = [(m, f, len(r)) for m, f, r, _ in _functions_taking_args() if len(r) > 8]
    assert not heavy, f"utils functions reading more than 8 flags: {heavy}"


def test_nothing_in_utils_writes_to_args():
    """Derived values live in utils.plan.TrainingPlan (or are returned to the script's parse_args)."""
    writes = [(m, f, sorted(w)) for m, f, _, w in _functions_taking_args() if w]
    assert not writes, f"utils functions writing into args: {writes}"
    assert any(len(r) >= 6 for _, _, r, _ in _functions_taking_args())  # the scan sees reads at all


# Flags two trainers accept under one name with a different meaning (so each defines its own).
SAME_NAME_OTHER_MEANING = {
    "--pretrained_model_name_or_path": "an SD/SDXL pipeline vs NextDiT weights",
    "--text_encoder_name_or_path": "a CLIP tokenizer+encoder vs any caption encoder (CLIP, T5, Gemma)",
    "--model_config": "a pipeline folder describing a single file vs NextDiT config keys",
    "--resolution": "SD: 512/1024 by model, bucketed; mask DiT: one square size",
    "--validation_split": "SD: a fraction or a folder/file; mask DiT: a fraction (--validation_data_dir for a folder)",
    "--guidance_scale": "FLUX.1 dev's distilled guidance fed to the transformer in training (diffusers' name) vs the "
                        "mask DiT's validation CFG scale",
}


def _flag_definitions() -> dict[str, list[str]]:
    """The files that define each option string (`add_argument("--x", ...)`) among the trainers and utils/, leaving
    out the standalone data/preset command lines in utils (functions named main/parse_args)."""
    sites: dict[str, list[str]] = {}
    for path in [repo_path(f"{t}.py") for t in TRAINERS] + glob.glob(repo_path("utils", "**", "*.py"), recursive=True):
        tree = ast.parse(open(path, encoding="utf-8").read())
        standalone = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in ("main", "parse_args")
                      and path.startswith(repo_path("utils"))]
        skipped = {id(n) for f in standalone for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and id(node) not in skipped:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                        where = sites.setdefault(arg.value, [])
                        where += [os.path.relpath(path, REPO_ROOT)] if os.path.relpath(path, REPO_ROOT) not in where else []
    return sites


def test_a_flag_the_trainers_share_is_defined_once():
    """Issue 29: a shared flag is one add_argument with per-script defaults, so names, help and checks cannot drift."""
    sites = _flag_definitions()
    twice = {flag: where for flag, where in sites.items() if len(where) > 1 and flag not in SAME_NAME_OTHER_MEANING}
    assert not twice, f"flags defined more than once: {twice}"
    stale = [flag for flag in SAME_NAME_OTHER_MEANING if len(sites.get(flag, [])) < 2]
    assert not stale, f"SAME_NAME_OTHER_MEANING lists flags defined once: {stale}"
