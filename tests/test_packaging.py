"""What the package declares is what it imports; the light client install runs the client verbs without torch.

The imports are read with ast from every module (nothing is imported), mapped to distributions with
importlib.metadata.packages_distributions(), and compared with pyproject.toml's dependencies and extras and with
requirements/client.txt. The client verbs run in a subprocess where torch, diffusers, MLflow and the metric
libraries cannot be imported, as in an environment installed from requirements/client.txt alone. clusters/Dockerfile
is parsed and held to its build context (.dockerignore) and to the README's install command.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from isosweep.results.layout import STATE_FILE
from isosweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CLIENT_TXT = ROOT / "requirements" / "client.txt"

# Declared but never imported by name, each on purpose.
RUNTIME_ONLY = {
    "torchvision": "lpips and clean-fid import it without a floor; it must be the build that matches torch",
    "accelerate": "diffusers' from_pretrained loads weights without a first random init only when it is installed",
    "boto3": "MLflow's S3 artifact store imports it for s3:// artifacts, and MLflow does not declare it",
}
RUNTIME_ONLY_TEST = {
    "pytest-timeout": "a pytest plugin, loaded by its entry point (@pytest.mark.timeout)",
    "moto": "tests start its `moto_server` executable as the S3 API server",
}
# What no client verb may import: the training, evaluation and tracking stack.
HEAVY = ("torch", "torchvision", "diffusers", "accelerate", "mlflow", "lpips", "cleanfid", "sklearn", "optuna", "matplotlib")


def _top_imports(path: Path, *, module_level: bool = False) -> set[str]:
    """Top-level names of the absolute imports of one module: anywhere in it, or (`module_level`) those run when it
    is imported, leaving out the ones inside functions and under `if TYPE_CHECKING:`."""
    names = set()
    todo = [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if module_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)  # `if TYPE_CHECKING:` imports are for the type checker only
            continue
        todo.extend(ast.iter_child_nodes(node))
    return names


def third_party(paths, own=("isosweep", "bench", "tests", "support", "conftest"), module_level=False) -> dict[str, set[str]]:
    """{distribution: modules importing it} for the given files; a name no distribution provides is an error
    unless it is the standard library, the project itself or a sibling test module."""
    dists = importlib.metadata.packages_distributions()
    siblings = {p.stem for p in paths}
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in _top_imports(path, module_level=module_level) - set(sys.stdlib_module_names) - set(own) - siblings:
            assert name in dists, f"{path}: imports {name!r}, which no installed distribution provides"
            for dist in dists[name]:
                found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def _names(requirements) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in requirements]
    return {canonicalize_name(r.name): r for r in reqs}


def _provided(imported: dict[str, set[str]], declared: dict[str, Requirement]) -> set[str]:
    """Imported distributions that no declared one stands for (mlflow provides the `mlflow` name with
    mlflow-skinny and mlflow-tracing: declaring any of a name's providers is enough)."""
    dists = importlib.metadata.packages_distributions()
    missing = set()
    for dist, files in imported.items():
        names = {n for n, ds in dists.items() if dist in {canonicalize_name(d) for d in ds}}
        providers = {canonicalize_name(d) for n in names for d in dists[n]}
        if not providers & set(declared):
            missing.add(f"{dist} (imported by {', '.join(sorted(files)[:3])})")
    return missing


MAIN = _names(PYPROJECT["dependencies"])
TEST = _names(PYPROJECT["optional-dependencies"]["test"])


def test_every_import_of_the_package_is_a_declared_dependency():
    imported = third_party(sorted((ROOT / "isosweep").rglob("*.py")))
    assert not _provided(imported, MAIN), f"imported by isosweep/ but not in [project] dependencies: {_provided(imported, MAIN)}"


def test_every_dependency_is_imported_or_a_stated_runtime_one():
    imported = third_party(sorted((ROOT / "isosweep").rglob("*.py")))
    unused = set(MAIN) - set(imported) - set(RUNTIME_ONLY)
    assert not unused, f"declared in pyproject.toml but never imported by isosweep/: {sorted(unused)}"
    assert set(RUNTIME_ONLY) <= set(MAIN), "RUNTIME_ONLY names a distribution that is no longer declared"


def test_the_test_extra_covers_the_tests_and_nothing_more():
    tests = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    imported = third_party(tests)
    missing = _provided(imported, {**MAIN, **TEST})
    assert not missing, f"imported by tests/ or bench/ but declared nowhere: {missing}"
    unused = set(TEST) - set(imported) - set(RUNTIME_ONLY_TEST)
    assert not unused, f"in the test extra but never imported by tests/: {sorted(unused)}"


def test_ray_floor_has_token_authentication():
    """The submit path imports Ray's AuthenticationError: the floor must be a Ray that has it (2.52)."""
    assert "from ray.exceptions import AuthenticationError" in (ROOT / "isosweep" / "sweep" / "jobs.py").read_text()
    assert not MAIN["ray"].specifier.contains("2.51.9"), "ray's floor is below 2.52, the first with token authentication"
    assert MAIN["ray"].specifier.contains(importlib.metadata.version("ray"))


def _client_requirements() -> dict[str, Requirement]:
    lines = [ln.split("#")[0].strip() for ln in CLIENT_TXT.read_text().splitlines()]
    return _names([ln for ln in lines if ln])


def test_client_requirements_are_the_packages_own():
    """Each line of requirements/client.txt is a dependency of the package, with the same bounds and a subset of
    its extras, and none of the heavy stack."""
    client = _client_requirements()
    for name, req in client.items():
        assert name in MAIN, f"requirements/client.txt: {name} is not a dependency in pyproject.toml"
        assert req.specifier == MAIN[name].specifier, f"requirements/client.txt: {req} differs from pyproject's {MAIN[name]}"
        assert req.extras <= MAIN[name].extras, f"requirements/client.txt: {req} asks for extras pyproject does not"
    assert not set(client) & {canonicalize_name(h) for h in HEAVY} - {"cleanfid", "sklearn"}


# Run in the subprocess: the heavy stack cannot be imported (as where it is not installed), every attempt is
# recorded, and at exit the loaded isosweep modules and the attempts are written as JSON to argv[1].
BLOCKER = """
import atexit, json, sys
out, argv = sys.argv[1], sys.argv[2:]
HEAVY = set({heavy!r})
attempts = []
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
def dump():
    mods = sorted(m for m in sys.modules if m == "isosweep" or m.startswith("isosweep."))
    json.dump({{"modules": mods, "attempts": attempts, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}},
              open(out, "w"))
atexit.register(dump)
from isosweep.cli import main
sys.exit(main(argv))
"""


def _run_client(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"modules-{argv[0]}.json"
    script = BLOCKER.format(heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", script, str(out), *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)})
    return proc, json.loads(out.read_text())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ISOSWEEP_", "MLFLOW_", "RAY_ADDRESS"))} | {"HF_HUB_OFFLINE": "1"}


def _client_modules_imports(modules: list[str]) -> dict[str, set[str]]:
    """The distributions the given isosweep modules import when they are imported (their functions' own imports
    ran, or were blocked and recorded, in the subprocess)."""
    paths = []
    for mod in modules:
        base = ROOT.joinpath(*mod.split("."))
        paths.append(base / "__init__.py" if base.is_dir() else base.with_suffix(".py"))
    return third_party(paths, module_level=True)


@pytest.fixture
def sweep_folder(tmp_path) -> Path:
    """A sweep folder as `run` leaves it before Tune saved anything: the state file with the spec."""
    spec = load_spec(ROOT / "search_spaces" / "demo.yaml", check_paths=False)
    sweep = tmp_path / "runs" / "demo-20261205-010000"
    sweep.mkdir(parents=True)
    (sweep / STATE_FILE).write_text(json.dumps({"sweep_id": sweep.name, "spec": spec.to_dict(), "status": "COMPLETED"}))
    return sweep


@pytest.mark.slow  # three interpreters that import Ray's Tune (about 10 s on 2 cores)
def test_client_verbs_run_without_the_heavy_stack(tmp_path, sweep_folder):
    client = set(_client_requirements())
    seen: set[str] = set()

    builtin_only = tmp_path / "builtin_metrics.yaml"
    builtin_only.write_text("extends: " + str(ROOT / "search_spaces" / "demo.yaml") + "\nevaluation:\n  metrics: [fid, ppl]\n")
    proc, loaded = _run_client(tmp_path, "validate", str(builtin_only))
    assert proc.returncode == 0, proc.stderr
    assert loaded["attempts"] == [] and loaded["heavy"] == [], loaded
    seen |= set(loaded["modules"])

    # the demo's edit_* metrics are registered by modules that need torch: validate says they are left to `run`
    proc, loaded = _run_client(tmp_path, "validate", "search_spaces/demo.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "edit_linearity" in proc.stderr and "`run` checks these names" in proc.stderr, proc.stderr
    assert loaded["heavy"] == [], loaded
    seen |= set(loaded["modules"])

    proc, loaded = _run_client(tmp_path, "status", str(sweep_folder))
    assert proc.returncode == 0, proc.stderr
    assert f"sweep {sweep_folder.name}" in proc.stdout
    assert loaded["attempts"] == [] and loaded["heavy"] == [], loaded
    seen |= set(loaded["modules"])

    # submit to a port nothing listens on: it gets as far as Ray's job client, which cannot connect
    proc, loaded = _run_client(tmp_path, "submit", "search_spaces/demo.yaml", "--set", f"storage.path={tmp_path / 'runs'}",
                               "--shared-fs", "--address", "http://127.0.0.1:9", "--token", "unused", "--no-wait")
    assert proc.returncode != 0 and "127.0.0.1:9" in proc.stderr, proc.stderr
    assert loaded["attempts"] == [] and loaded["heavy"] == [], loaded
    assert "isosweep.sweep.jobs" in loaded["modules"]
    seen |= set(loaded["modules"])

    needed = _client_modules_imports(sorted(seen))
    missing = _provided(needed, {n: r for n, r in MAIN.items() if n in client})
    assert not missing, f"the client verbs import what requirements/client.txt does not list: {missing}"


# clusters/Dockerfile and the .dockerignore beside the repository root (its build context)
DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                       "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comment lines (also inside one) dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word, " ".join(rest.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _pip_install_args(command: str) -> list[str]:
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["pip", "install"]) + 2
    end = next((i for i in range(start, len(words)) if words[i] in ("&&", ";", "||")), len(words))
    return [w for w in words[start:end] if w != "--no-cache-dir"]  # the image keeps no pip cache: not a difference


def test_dockerfile_parses_and_copies_what_its_context_holds():
    from bench.docker_context import context_files

    steps = dockerfile_instructions((ROOT / "clusters" / "Dockerfile").read_text())
    words = [w for w, _ in steps]
    assert words and set(words) <= DOCKER_INSTRUCTIONS, f"unknown Dockerfile instructions: {set(words) - DOCKER_INSTRUCTIONS}"
    assert next(w for w in words if w != "ARG") == "FROM", "the first instruction (after ARGs) must be FROM"
    context = set(context_files())
    copies = [shlex.split(args) for word, args in steps if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        *sources, _dest = [a for a in args if not a.startswith("--")]
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"clusters/Dockerfile copies {src}, which is missing"
            files = [str(p.relative_to(ROOT)) for p in ([path] if path.is_file() else path.rglob("*"))
                     if p.is_file() and "__pycache__" not in p.parts]
            assert files and set(files) <= context, f"clusters/Dockerfile copies {src}, which .dockerignore keeps out: {set(files) - context}"
    # nothing the image does not need travels to the daemon
    assert {f.split("/")[0] for f in context} <= {"pyproject.toml", "README.md", "requirements", "isosweep", "search_spaces",
                                                  "clusters", ".dockerignore"}  # the last two: Docker sends them always
    assert not any(f.startswith((".venv", ".git/", "runs/", "tests/", "docs/")) for f in context)
    assert {f for f in context if f.startswith("clusters/")} == {"clusters/Dockerfile"}


def test_dockerfile_installs_the_package_as_the_readme_says():
    readme = (ROOT / "README.md").read_text().split("## Installing", 1)[1].split("\n## ", 1)[0]
    readme_installs = [_pip_install_args(ln) for ln in readme.splitlines() if ln.startswith("pip install -c requirements/constraints.txt")]
    runs = [args for word, args in dockerfile_instructions((ROOT / "clusters" / "Dockerfile").read_text()) if word == "RUN" and "pip install" in args]
    assert len(runs) == 1 and _pip_install_args(runs[0]) in readme_installs, (runs, readme_installs)


def test_hadolint_finds_nothing_where_it_is_installed():
    """hadolint is not a dependency: where it is on PATH (a CI image may have it), its findings fail the test."""
    if shutil.which("hadolint") is None:
        return
    proc = subprocess.run(["hadolint", str(ROOT / "clusters" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_help_describes_every_target():
    """`make help` prints a description of every phony target of the Makefile (its `## target:` lines)."""
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).split()
    proc = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    described = [ln.split(":")[0] for ln in proc.stdout.splitlines() if ln and not ln.startswith(" ")]
    assert sorted(described) == sorted(phony), proc.stdout
