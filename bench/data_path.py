"""How far one value travels through the house: the rooms a parameter enters as the calls pass it on.

    python -m bench.data_path isosweep/sweep/driver.py:run_sweep:spec

Read from the source (nothing is run): starting at FUNCTION, every call whose arguments mention the value (or a
name derived from it: `x = f(spec)`, `self.spec = spec`) is followed into the isosweep function it reaches, as the
parameter it binds to; a method of an object that holds the value (`self.spec`) is followed too. A room is a
folder of isosweep/ or a loose module (`sweep/`, `storage.py`); its layer is docs/architecture.md's layer table.
Prints the rooms in the order they are entered, the moves between rooms and the climbs (a move to a higher
layer: back up the stack after a trip down). Fewer moves and climbs: a value handed down once rather than
fetched back and forth. Calls the reader cannot resolve (a callback, a value's own methods) are not followed.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "isosweep"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_map(architecture: Path = ARCHITECTURE) -> dict[str, int]:
    """unit (a top-level module or folder of isosweep) -> layer, from the layer table of docs/architecture.md (the one
    place the map is written): rows `| N | `unit/`, `unit.py` | what |` after its `| layer | units |` header."""
    layers: dict[str, int] = {}
    rows = architecture.read_text().split("| layer | units |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    for row in rows:
        layer, units = (c.strip() for c in row.strip().strip("|").split("|")[:2])
        for unit in units.split(","):
            layers[unit.strip().strip("`").removesuffix("/").removesuffix(".py")] = int(layer)
    return layers


@dataclass
class Module:
    name: str  # dotted, without `isosweep.`
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)  # "f" and "Class.method"
    classes: set[str] = field(default_factory=set)
    imported: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local name -> (module, attribute or None)


def index(package: Path = PACKAGE) -> dict[str, Module]:
    """Every module of the package with its functions, classes and isosweep imports."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        mod, tree = Module(name), ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                mod.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                mod.classes.add(node.name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        mod.functions[f"{node.name}.{item.name}"] = item
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package.name:
                base = node.module.removeprefix(package.name).lstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    mod.imported[a.asname or a.name] = (sub, None) if sub in _names(package) else (base, a.name)
        out[name] = mod
    return out


def _names(package: Path) -> set[str]:
    return {_module_name(p, package) for p in package.rglob("*.py")}


def _module_name(path: Path, package: Path) -> str:
    """`sweep.driver`; a folder's `__init__.py` is the folder (`spec`); the package's own is `__init__`."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def room_of(module: str) -> str:
    """The folder a module is in, or the loose module itself."""
    head = module.split(".")[0]
    return f"{head}/" if "." in module else f"{head}.py"


@dataclass
class Walk:
    modules: dict[str, Module]
    rooms: list[str] = field(default_factory=list)  # the module entered at each stay, in order
    seen: set[tuple[str, str]] = field(default_factory=set)
    held: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def visit(self, module: str, qualname: str, tracked: set[str], types: dict[str, str] | None = None) -> set[str]:
        """Walk one function with `tracked` naming the value; returns the attributes of `self` that hold it after."""
        key = (module, qualname)  # each function is walked once; a later call still enters its room
        fn = self.modules[module].functions.get(qualname)
        if fn is None:
            return set()
        if key in self.seen:
            self.rooms.append(module)
            return self.held.get(key, set())
        self.seen.add(key)
        self.rooms.append(module)
        cls = qualname.split(".")[0] if "." in qualname else None
        types = dict(types or {})
        for node in _in_order(fn):
            call = node.value if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) else node
            held = self._call(module, cls, call, tracked, types) if isinstance(call, ast.Call) else set()
            if not isinstance(node, ast.Assign):
                continue
            names = [_dotted(t) for t in node.targets if _dotted(t)]
            for target_, value in _pairs(node):
                if _mentions(value, tracked):
                    tracked |= {n for t in ast.walk(target_) if isinstance(t, (ast.Name, ast.Attribute)) and (n := _dotted(t))}
            for name in names:  # an object built here holds what its constructor stored on self
                tracked |= {name + h.removeprefix("self") for h in held}
            target = self._resolve(module, cls, call.func, types) if isinstance(call, ast.Call) else None
            if target and target[1].endswith(".__init__"):
                types.update({name: f"{target[0]}:{target[1].split('.')[0]}" for name in names})
        self.held[key] = {t for t in tracked if t.startswith("self.")}
        return self.held[key]

    def _call(self, module: str, cls: str | None, call: ast.Call, tracked: set[str], types: dict[str, str]) -> set[str]:
        target = self._resolve(module, cls, call.func, types)
        if target is None:
            return set()
        callee = self.modules[target[0]].functions.get(target[1]) if target[0] in self.modules else None
        if callee is None:
            return set()
        params = [a.arg for a in callee.args.args]
        bound = params[1:] if target[1].count(".") and params[:1] in (["self"], ["cls"]) else params
        carried = {p for p, arg in zip(bound, call.args) if _mentions(arg, tracked)}
        carried |= {kw.arg for kw in call.keywords if kw.arg in params and _mentions(kw.value, tracked)}
        owner = _dotted(call.func.value) if isinstance(call.func, ast.Attribute) else ""
        on_owner = {"self" + t.removeprefix(owner) for t in tracked if owner and t.startswith(owner + ".")}
        if not (carried or on_owner):
            return set()
        return self.visit(target[0], target[1], carried | on_owner, types if target[0] == module else None)

    def _resolve(self, module: str, cls: str | None, func: ast.expr, types: dict[str, str]) -> tuple[str, str] | None:
        mod = self.modules[module]
        if isinstance(func, ast.Name):
            name = func.id
            if name in mod.functions:
                return module, name
            if name in mod.classes:
                return module, f"{name}.__init__"
            if name in mod.imported:
                where, attr = mod.imported[name]
                return self._member(where, attr)
        elif isinstance(func, ast.Attribute):
            owner = _dotted(func.value)
            if owner == "self" and cls:
                return module, f"{cls}.{func.attr}"
            if owner in types:
                where, kind = types[owner].split(":")
                return where, f"{kind}.{func.attr}"
            if owner in mod.imported and mod.imported[owner][1] is not None:  # a class imported by name: its classmethod
                init = self._member(*mod.imported[owner])
                return (init[0], init[1].replace("__init__", func.attr)) if init and init[1].endswith(".__init__") else None
            if owner in mod.classes:
                return module, f"{owner}.{func.attr}"
            if owner in mod.imported:
                where, attr = mod.imported[owner]
                return self._member(where, func.attr) if attr is None else (where, f"{attr}.{func.attr}")
        return None

    def _member(self, where: str, attr: str | None) -> tuple[str, str] | None:
        if attr is None or where not in self.modules:
            return None
        target = self.modules[where]
        if attr in target.classes:
            return where, f"{attr}.__init__"
        if attr in target.functions:
            return where, attr
        if attr in target.imported and target.imported[attr][0] != where:  # a package's face hands the name on
            return self._member(*target.imported[attr])
        return None


def _in_order(fn: ast.AST):
    """The assignments and calls of a function body in the order they are written; a function defined inside
    runs later, when called (by Ray, say), so its body is not part of this trip."""
    inner = {id(n) for d in ast.walk(fn) if d is not fn and isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
             for n in ast.walk(d)}
    body = [n for n in ast.walk(fn) if id(n) not in inner]
    assigned = {id(n.value) for n in body if isinstance(n, ast.Assign)}
    nodes = [n for n in body if isinstance(n, ast.Assign) or (isinstance(n, ast.Call) and id(n) not in assigned)]
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def _pairs(node: ast.Assign) -> list[tuple[ast.expr, ast.expr]]:
    """(target, value) pairs of an assignment, element by element for `a, b = x, y`."""
    out = []
    for target in node.targets:
        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) and len(target.elts) == len(node.value.elts):
            out += list(zip(target.elts, node.value.elts))
        else:
            out.append((target, node.value))
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _mentions(expr: ast.AST, tracked: set[str]) -> bool:
    """Does the expression hand on a tracked name, or an attribute of one (`spec.train`, `self.spec.name`)? A value
    formatted into an f-string is text, not the value: not counted."""
    inside_text = {id(n) for s in ast.walk(expr) if isinstance(s, ast.JoinedStr) for n in ast.walk(s)}
    for node in ast.walk(expr):
        if id(node) in inside_text:
            continue
        name = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else ""
        if name and any(name == t or name.startswith(t + ".") for t in tracked):
            return True
    return False


@dataclass
class Route:
    rooms: list[str]  # a room per stay, consecutive repeats merged
    layers: dict[str, int]

    @property
    def moves(self) -> int:
        return len(self.rooms) - 1

    @property
    def climbs(self) -> int:
        return sum(1 for a, b in zip(self.rooms, self.rooms[1:]) if self.layers[_unit(b)] > self.layers[_unit(a)])


def _unit(room: str) -> str:
    return room.removesuffix("/").removesuffix(".py")


def route(start: str, package: Path = PACKAGE, architecture: Path = ARCHITECTURE) -> Route:
    """The route of `FILE:FUNCTION:PARAM` (FILE relative to the repository root or to `package`'s parent)."""
    file, function, param = start.rsplit(":", 2)
    module = _module_name(package.parent / file, package)
    walk = Walk(index(package))
    walk.visit(module, function, {param})
    rooms: list[str] = []
    for m in walk.rooms:
        if not rooms or rooms[-1] != room_of(m):
            rooms.append(room_of(m))
    return Route(rooms, layer_map(architecture))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("start", help="FILE:FUNCTION:PARAM, e.g. isosweep/sweep/driver.py:run_sweep:spec")
    args = parser.parse_args()
    r = route(args.start)
    for i, room in enumerate(r.rooms):
        step = "" if i == 0 else (" (climb)" if r.layers[_unit(room)] > r.layers[_unit(r.rooms[i - 1])] else "")
        print(f"{i + 1:3d}. layer {r.layers[_unit(room)]}  {room}{step}")
    print(f"{len(set(r.rooms))} rooms entered, {r.moves} moves between rooms, {r.climbs} climbs back up")


if __name__ == "__main__":
    main()
