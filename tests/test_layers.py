"""The package is a stack of layers that import only downward (docs/architecture.md), checked from the source.

Every `import` in every module counts, at the top of a file or inside a function. A module may import
isosweep modules of a lower layer, or of its own folder; Ray only in `sweep/`; MLflow only in
`tracking/` and `commands/`; nothing imports `commands/` but `cli.py`. The layout itself is named here,
so a missing module fails the test instead of being skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import isosweep
from bench.data_path import layer_map

PACKAGE = Path(isosweep.__file__).parent

ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


LAYERS = layer_map(ARCHITECTURE)  # docs/architecture.md's layer table, the one place the map is written
ALLOWED_THIRD_PARTY = {"ray": {"sweep"}, "mlflow": {"tracking", "commands"}}
EXPECTED = {
    "core": ["geometry", "hspace", "losses", "sampling", "inversion", "ema", "names", "step", "progress"],
    "spec": ["sections", "evaluation", "fields", "load", "changes", "reference"],
    "data": ["datasets", "images", "attributes"],
    "models": ["loading", "builtin"],
    "training": ["loop", "checkpoint", "reporting", "best_step"],
    "evaluation": ["suite", "record", "metrics/fid", "metrics/ppl", "metrics/rtl", "metrics/jacobian", "metrics/separability",
                   "metrics/paths", "metrics/samples", "metrics/confidence", "features/resolver", "features/standard", "features/domain",
                   "features/attributes", "features/common", "suite_metrics/base", "suite_metrics/fid", "suite_metrics/ppl",
                   "suite_metrics/mrtl", "suite_metrics/jacobian", "suite_metrics/ls"],
    "results": ["layout", "rows", "tables", "pareto", "states", "plots", "report", "full_eval_records", "place", "publish", "readback"],
    "tracking": ["client", "runs", "steps", "artifacts", "sync", "registry", "models", "pyfunc_model", "serving_modes", "tracker"],
    "sweep": ["ray_env", "search", "callbacks", "trainer", "trial", "driver", "jobs", "resources", "monitoring", "full_eval"],
    "commands": ["validate", "sweep", "submit", "train", "evaluate", "models", "invert", "sync"],
}
MAX_LINES = 450  # "about 400": a module past this is doing more than one thing


def _modules() -> dict[str, Path]:
    """Dotted module name (without `isosweep.`) -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def _unit(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path, module: str) -> list[str]:
    """Every module name `path` imports, anywhere in the file (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ("isosweep." + module).split(".")[: -node.level]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.append(prefix)
            if prefix == "isosweep" or prefix.startswith("isosweep."):
                names += [f"{prefix}.{a.name}" for a in node.names]  # `from isosweep.x import y` may name a module y
    return names


def _isosweep_targets(names: list[str], modules: dict[str, Path]) -> set[str]:
    out = set()
    for name in names:
        if name.startswith("isosweep."):
            inner = name.removeprefix("isosweep.")
            if inner in modules or any(m.startswith(inner + ".") for m in modules):
                out.add(inner)
    return out


def test_every_named_module_exists():
    modules = _modules()
    missing = [f"{unit}/{name}" for unit, names in EXPECTED.items() for name in names
               if f"{unit}.{name.replace('/', '.')}" not in modules]
    assert not missing, f"modules of the documented layout are missing: {missing}"
    unknown = sorted({_unit(m) for m in modules} - set(LAYERS))
    assert not unknown, f"modules outside the layer map {unknown}: give them a layer in docs/architecture.md's layer table"


def test_imports_point_downward():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        unit = _unit(module)
        for target in _isosweep_targets(_imports(path, module), modules):
            if target == "" or _unit(target) == unit:
                continue
            if LAYERS[_unit(target)] >= LAYERS[unit]:
                wrong.append(f"{module} imports {target} (layer {LAYERS[_unit(target)]} >= {LAYERS[unit]})")
    assert not wrong, "imports that do not point down the layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize("library", sorted(ALLOWED_THIRD_PARTY))
def test_ray_and_mlflow_stay_in_their_layers(library):
    allowed = ALLOWED_THIRD_PARTY[library]
    wrong = [module for module, path in _modules().items()
             if _unit(module) not in allowed and any(n == library or n.startswith(library + ".") for n in _imports(path, module))]
    assert not wrong, f"{library} imported outside {sorted(allowed)}: {wrong}"


def test_no_import_cycles_inside_a_folder():
    modules = _modules()
    graph = {m: {t for t in _isosweep_targets(_imports(p, m), modules) if _unit(t) == _unit(m) and t in modules and t != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_cli_dispatches_to_existing_commands():
    from isosweep.cli import COMMANDS, build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert verbs == set(COMMANDS)
    for module, function in COMMANDS.values():
        spec = importlib.util.find_spec(f"isosweep.commands.{module}")
        assert spec is not None, f"isosweep.commands.{module} is missing"
        assert f"def {function}(" in Path(spec.origin).read_text(), f"isosweep.commands.{module} has no {function}"


def test_modules_stay_small():
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def _output_calls(path: Path) -> list[str]:
    """`print(...)` calls and isosweep's own loggers (`logging.getLogger(__name__)`, `log.warning(...)`) in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "print":
            found.append(f"print at line {node.lineno}")
        elif isinstance(f, ast.Attribute) and f.attr == "getLogger" and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id == "__name__":
            found.append(f"getLogger(__name__) at line {node.lineno}")
    return found


def test_every_line_goes_out_through_the_console():
    """One output channel (`console`: say, warn, result, note): a bare print or a module logger elsewhere would
    write lines that bypass its prefix, its stream and its flush."""
    stray = {m: calls for m, p in _modules().items() if m != "console" and (calls := _output_calls(p))}
    assert not stray, f"print or a module logger outside isosweep/console.py: {stray}"


def test_the_math_and_data_import_neither_ray_nor_mlflow_transitively():
    """Imported in a fresh interpreter: what the lower layers pull in, through every dependency."""
    lower = [f"isosweep.{m}" for m, _ in _modules().items() if LAYERS[_unit(m)] <= LAYERS["training"] and not m.endswith("__init__")]
    code = "import sys\n" + "".join(f"import {name}\n" for name in lower) + \
           "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    top_level = set(result.stdout.split())
    assert "torch" in top_level  # the probe itself works
    assert not {"ray", "mlflow"} & top_level, f"importing the layers up to training/evaluation pulled in {sorted({'ray', 'mlflow'} & top_level)}"


def test_the_cli_and_spec_loading_start_without_torch_ray_or_mlflow():
    """`isosweep --help` and `isosweep validate` load only the CLI and the spec: no torch, Ray or MLflow (seconds each)."""
    code = ("import sys, isosweep.cli, isosweep.spec\n"
            "isosweep.spec.load_spec(sys.argv[1], check_paths=False)\n"
            "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))\n")
    demo = PACKAGE.parent / "search_spaces" / "demo.yaml"
    result = subprocess.run([sys.executable, "-c", code, str(demo)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.split())
    assert "pydantic" in loaded and not {"torch", "ray", "mlflow"} & loaded, sorted({"torch", "ray", "mlflow"} & loaded)


def test_results_and_status_read_a_sweep_without_torch_or_mlflow():
    """`isosweep results/status/resume` load the sweep verbs and a sweep's outcome without torch, MLflow, the feature
    networks or Ray (isosweep's own JSON only): a status poll takes a second, and a refused resume answers before Ray starts."""
    code = ("import sys, isosweep.commands.sweep, isosweep.results.readback\n"
            "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.split())
    heavy = {"torch", "mlflow", "lpips", "cleanfid", "ray"}
    assert not heavy & loaded, sorted(heavy & loaded)


def _private_mlflow_uses(path: Path, module: str) -> list[str]:
    """`mlflow.x._y` imports, `from mlflow.x import _y` and `mlflow...._y` attributes in a file."""
    found = [n for n in _imports(path, module) if n.split(".")[0] == "mlflow" and any(p.startswith("_") for p in n.split("."))]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id == "mlflow":
                found.append(ast.unparse(node))
    return found


def test_no_private_mlflow_api():
    """Only MLflow's public API: a private helper may change or vanish in any release (docs/tracking.md)."""
    wrong = {m: uses for m, p in _modules().items() if (uses := _private_mlflow_uses(p, m))}
    assert not wrong, f"private MLflow APIs used: {wrong}"


def test_the_served_model_imports_only_the_isosweep_code_logged_with_it():
    """tracking/pyfunc_model.py is logged as the model's code with `registry.SERVED_CODE` beside it (MLflow's code_paths):
    whoever serves it has mlflow, torch, diffusers and pillow, not isosweep (tests/test_tracking.py loads it where
    isosweep is not installed). So every isosweep module it reaches is in SERVED_CODE, and nothing else is needed."""
    from isosweep.tracking.registry import SERVED_CODE

    served = {"tracking.pyfunc_model"} | {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in SERVED_CODE}
    modules = _modules()
    reached, todo, outside = set(), ["tracking.pyfunc_model"], set()
    while todo:
        module = todo.pop()
        reached.add(module)
        names = _imports(modules[module], module)
        outside |= {n.split(".")[0] for n in names if n.split(".")[0] != "isosweep"}
        todo += sorted(_isosweep_targets(names, modules) - reached)
    assert reached - {"isosweep"} <= served, f"the served model imports {sorted(reached - served)}, not logged with it (SERVED_CODE)"
    allowed = {"__future__", "base64", "binascii", "collections", "contextlib", "copy", "dataclasses", "functools", "importlib",
               "inspect", "io", "math", "os", "sys", "threading", "time", "typing", "mlflow", "numpy", "torch", "diffusers", "PIL",
               "tqdm"}
    assert outside <= allowed, sorted(outside - allowed)
