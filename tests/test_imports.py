"""The math modules import torch, numpy and diffusers only: never Ray or MLflow (docs/architecture.md)."""

import importlib.util
import subprocess
import sys

REQUIRED = ("isosweep.geometry", "isosweep.hspace")
OPTIONAL = ("isosweep.losses", "isosweep.sampling", "isosweep.metrics", "isosweep.data", "isosweep.backbones")
FORBIDDEN = ("ray", "mlflow")


def _imported_in_fresh_interpreter(modules: list[str]) -> set[str]:
    """Import `modules` in a new Python and return the top-level names in its sys.modules."""
    imports = "".join(f"import {name}\n" for name in modules)
    code = "import sys\n" + imports + "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


def test_required_math_modules_exist():
    for name in REQUIRED:
        assert importlib.util.find_spec(name) is not None, f"{name} is missing"


def test_math_modules_do_not_import_ray_or_mlflow():
    modules = list(REQUIRED) + [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
    top_level = _imported_in_fresh_interpreter(modules)
    assert "torch" in top_level  # the probe itself works
    pulled_in = sorted(set(FORBIDDEN) & top_level)
    assert not pulled_in, f"importing {modules} pulled in {pulled_in}"
