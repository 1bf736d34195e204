"""`python -m bench.data_path`: the rooms a value enters as the calls pass it on, counted on a small package
whose route is known, then the sweep's own route held under its ceiling (DEVELOPERS.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from bench import data_path

ROOT = Path(__file__).resolve().parents[1]

# layer 2: top.py; layer 1: mid/; layer 0: low.py
FILES = {
    "top.py": """
        from pkg import low
        from pkg.mid.helpers import Holder, keep

        def start(value, other):
            name = low.text(other)            # not the value: not followed
            low.text(f"{value}")              # formatted into text: not handed on
            derived = keep(value)             # mid/, then low.py from inside it
            h = Holder(derived)               # the object now holds it
            h.use()                           # so its method is followed
            tidy(derived)                     # back into top.py: a climb
            return low.text(derived)          # low.py again

        def tidy(v):
            return v
    """,
    "mid/__init__.py": "",
    "mid/helpers.py": """
        from pkg import low

        def keep(v):
            low.text(v)
            return v

        class Holder:
            def __init__(self, v):
                self.v = v

            def use(self):
                low.text(self.v)
    """,
    "low.py": """
        def text(x):
            return str(x)
    """,
}
ARCH = """
| layer | units | what |
|---|---|---|
| 2 | `top.py` | entry |
| 1 | `mid/` | helpers |
| 0 | `low.py` | leaves |

"""


def _package(tmp_path: Path) -> tuple[Path, Path]:
    pkg = tmp_path / "pkg"
    for name, text in FILES.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    (tmp_path / "architecture.md").write_text(ARCH)
    return pkg, tmp_path / "architecture.md"


def test_the_route_follows_the_value_its_derived_names_and_the_object_that_holds_it(tmp_path):
    pkg, arch = _package(tmp_path)
    r = data_path.route("pkg/top.py:start:value", package=pkg, architecture=arch)
    # start | keep | low.text | Holder.__init__, Holder.use | low.text | tidy | low.text
    assert r.rooms == ["top.py", "mid/", "low.py", "mid/", "low.py", "top.py", "low.py"]
    assert (r.moves, r.climbs) == (6, 2)  # up from low.py into mid/ (Holder), and from low.py into top.py (tidy)


def test_the_layer_map_is_read_from_the_architecture_docs_table(tmp_path):
    """The table's rows, units split on commas, folders and modules by their bare name; the real table orders the stack."""
    _, arch = _package(tmp_path)
    assert data_path.layer_map(arch) == {"top": 2, "mid": 1, "low": 0}
    layers = data_path.layer_map()
    assert layers["cli"] > layers["commands"] > layers["sweep"] > layers["tracking"] > layers["results"] > layers["models"]
    assert layers["spec"] == layers["storage"] == layers["data"] > layers["core"] == layers["console"]


def test_a_sweeps_spec_stays_under_the_ceiling_of_moves_and_climbs():
    """The ceiling is today's route; lower it when a change shortens the route (DEVELOPERS.md)."""
    out = subprocess.run([sys.executable, "-m", "bench.data_path", "isosweep/sweep/driver.py:run_sweep:spec"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    r = data_path.route("isosweep/sweep/driver.py:run_sweep:spec")
    assert out.rstrip().endswith(f"{r.moves} moves between rooms, {r.climbs} climbs back up")
    assert r.moves <= 85 and r.climbs <= 41, out
