"""Static device hygiene of the algorithms and the shared SGD loop: nothing that runs on the run's device may be
created on the CPU by accident.

A run with ``--device cuda`` hands every hook its tensors on the GPU; a tensor made on the CPU and combined with them
("Expected all tensors to be on the same device") fails there, but never on this machine's CPU, so the CPU tests
cannot see it. This test parses (``ast``) every module of ``fedforge/algorithms`` and ``core/training.py`` and fails on

1. a tensor factory (``torch.zeros``, ``ones``, ``full``, ``empty``, ``arange``, ``eye``, ``rand``, ``randn``,
   ``randint``, ``randperm``, ``tensor``, ``as_tensor``, ``linspace``, ``logspace``, ``Generator``, ``from_numpy``)
   called without a ``device=`` keyword, or with a literal CPU device. ``*_like`` factories take their input's
   device and are fine; a device derived from something (``device=x.device``, ``device=rt.device``,
   ``device=self.ctx.device``, ``device=gen.device``) is fine. The few calls that must stay on the CPU are in
   :data:`CPU_ONLY`, each with its reason; an entry that no longer matches any call fails too, so the list stays
   honest;
2. ``.numpy()`` on anything but ``.cpu()`` (a GPU tensor has no numpy view);
3. a module built inside a method that runs during the federation (any method but ``__init__`` and
   ``init_server``, whose returned state the engine moves) that is left on the CPU: a ``build_model(...)``,
   ``create_model(...)``, ``nn.<Layer>(...)`` or a module class of the same file must be moved with ``.to(...)``
   (in the same expression, or later through the name it was assigned to), unless the method returns it (a
   builder: its caller moves it).

The checker is also run on small sources that break each rule (it must flag them), and on the files as they stood
before the device fixes of issue 19 would fail it (checked by hand with ``git show``; the rules are what caught them).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "fedforge"
FACTORIES = frozenset({"zeros", "ones", "full", "empty", "arange", "eye", "rand", "randn", "randint", "randperm",
                       "tensor", "as_tensor", "linspace", "logspace", "Generator", "from_numpy"})
MODULE_BUILDERS = frozenset({"build_model", "create_model"})
NOT_MODULES = frozenset({"Parameter", "ParameterList", "ParameterDict", "Buffer"})  # wrap tensors made elsewhere
EXEMPT_METHODS = frozenset({"__init__", "init_server"})

# (file relative to fedforge/, enclosing function's qualified name, factory | "numpy" | builder) → why it is right.
CPU_ONLY: dict[tuple[str, str, str], str] = {
    ("algorithms/fedktl.py", "FedKTL._server_rng", "Generator"):
        "the generators' sample_prior (fedforge.generative) draws on the CPU; align moves the permutations and the "
        "prior samples to the server's device",
    ("algorithms/fedktl.py", "FedKTL.init_server", "randn"):
        "the initial centroids come from the CPU random stream, like F's initial weights (the same on every "
        "device); they are moved to the run's device before init_server returns them",
    ("algorithms/fedl2g.py", "FedL2G.init_server", "Generator"):
        "the initial guiding vectors are drawn on the CPU (the same on every device), then moved to the run's device",
    ("algorithms/fedl2g.py", "FedL2G.init_server", "randn"):
        "drawn from that CPU generator, then moved to the run's device",
    ("algorithms/fedcross.py", "FedCross.slot", "Generator"):
        "the round's slot permutation is a host decision (read with int(...)), drawn on the CPU",
    ("algorithms/fedcross.py", "FedCross.slot", "randperm"):
        "drawn from that CPU generator; only read on the host",
    ("algorithms/mechanics.py", "holdout_positions", "Generator"):
        "a held-out split drawn on the CPU is the same on every device; the positions are moved to ``device``",
}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    where: str
    what: str
    key: tuple[str, str, str]  # the CPU_ONLY key that would excuse it

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.where or '<module>'}: {self.what}"


def _is_cpu_literal(node: ast.expr) -> bool:
    """``None``, ``"cpu"``, or ``torch.device("cpu")``: a device that is not derived from anything."""
    if isinstance(node, ast.Constant):
        return node.value is None or (isinstance(node.value, str) and node.value.split(":")[0] == "cpu")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device":
        return len(node.args) == 1 and _is_cpu_literal(node.args[0]) and node.args[0].value is not None
    return False


def _factory_name(call: ast.Call, torch_names: set[str], imported: dict[str, str]) -> str | None:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id in torch_names:
        return f.attr
    if isinstance(f, ast.Name) and imported.get(f.id) in FACTORIES:
        return imported[f.id]
    return None


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


class _Checker(ast.NodeVisitor):
    def __init__(self, rel: str, tree: ast.Module):
        self.rel = rel
        self.findings: list[Finding] = []
        self.scope: list[str] = []
        self.class_stack: list[str] = []
        self.torch_names = {"torch"}
        self.imported: dict[str, str] = {}  # local name → torch factory imported by name
        self.nn_names = {"nn"}
        self.module_classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef) and any(
            (isinstance(b, ast.Attribute) and b.attr == "Module") or (isinstance(b, ast.Name) and b.id == "Module")
            for b in n.bases)}
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent

    # ------------------------------------------------------------------------------------------ scopes
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name == "torch":
                self.torch_names.add(a.asname or "torch")
            if a.name == "torch.nn":
                self.nn_names.add(a.asname or "nn")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "torch":
            for a in node.names:
                if a.name in FACTORIES:
                    self.imported[a.asname or a.name] = a.name
                if a.name == "nn":
                    self.nn_names.add(a.asname or "nn")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.class_stack.append(node.name)
        self.generic_visit(node)
        self.class_stack.pop()
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        if self._is_method(node) and node.name not in EXEMPT_METHODS:
            self._check_modules(node)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _is_method(self, node: ast.FunctionDef) -> bool:
        return isinstance(self.parents.get(node), ast.ClassDef)

    @property
    def where(self) -> str:
        return ".".join(self.scope)

    def _add(self, node: ast.AST, what: str, token: str) -> None:
        self.findings.append(Finding(self.rel, node.lineno, self.where, what, (self.rel, self.where, token)))

    # ------------------------------------------------------------------------------ rules 1 and 2
    def visit_Call(self, node: ast.Call) -> None:
        name = _factory_name(node, self.torch_names, self.imported)
        if name is not None:
            dev = next((k.value for k in node.keywords if k.arg == "device"), None)
            if dev is None or _is_cpu_literal(dev):
                how = ("takes no device: use torch.as_tensor(..., device=...)" if name == "from_numpy" else
                       "has no device= (pass the device of the tensors it meets: x.device, rt.device, "
                       "self.ctx.device, gen.device)" if dev is None else "is pinned to the CPU")
                self._add(node, f"torch.{name}(...) {how}", name)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "numpy" and not node.args:
            recv = f.value
            if not (isinstance(recv, ast.Call) and isinstance(recv.func, ast.Attribute) and recv.func.attr == "cpu"):
                self._add(node, ".numpy() on a tensor that may live on a GPU: call .cpu().numpy()", "numpy")
        self.generic_visit(node)

    # ------------------------------------------------------------------------------------------ rule 3
    def _builds_module(self, call: ast.Call) -> bool:
        f = call.func
        if isinstance(f, ast.Attribute) and f.attr in MODULE_BUILDERS:
            return True
        if isinstance(f, ast.Name) and (f.id in MODULE_BUILDERS or f.id in self.module_classes):
            return True
        return (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in self.nn_names
                and f.attr[:1].isupper() and f.attr not in NOT_MODULES)

    def _moved_in_chain(self, node: ast.AST, stop: ast.AST) -> bool:
        """Whether an enclosing expression (up to the statement) calls ``.to(...)`` on what ``node`` built, or only
        reads its weights (``.state_dict()``, ``.feature_dim``, ...)."""
        cur = node
        while cur is not stop and not isinstance(cur, ast.stmt):
            parent = self.parents.get(cur)
            if isinstance(parent, ast.Attribute) and parent.value is cur:
                if parent.attr == "to":
                    return True
                if parent.attr in ("state_dict", "named_parameters", "parameters", "feature_dim"):
                    return True
            cur = parent
        return False

    def _check_modules(self, fn: ast.FunctionDef) -> None:
        moved_names = {n.func.value.id for n in ast.walk(fn) if isinstance(n, ast.Call)
                       and isinstance(n.func, ast.Attribute) and n.func.attr == "to" and isinstance(n.func.value, ast.Name)}
        returned = {n.value.id for n in ast.walk(fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Call) and self._builds_module(node)):
                continue
            if self._moved_in_chain(node, fn):
                continue
            stmt = node
            while not isinstance(stmt, ast.stmt):
                stmt = self.parents[stmt]
            if isinstance(stmt, ast.Return) and stmt.value is node:
                continue  # a builder: its caller moves the module
            if (isinstance(stmt, ast.Assign) and stmt.value is node and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)):
                name = stmt.targets[0].id
                if name in moved_names or name in returned:
                    continue
            self._add(node, f"{_call_name(node)}(...) builds a module on the CPU in a method that runs during the "
                            f"federation: move it with .to(<the device of its inputs>)", _call_name(node) or "?")


def check_source(text: str, rel: str) -> list[Finding]:
    """Every violation of the three rules in one module's source (``rel``: its path relative to fedforge/)."""
    tree = ast.parse(text, filename=rel)
    c = _Checker(rel, tree)
    c.visit(tree)
    return c.findings


def scanned_files() -> list[Path]:
    return sorted((SRC / "algorithms").glob("*.py")) + [SRC / "core" / "training.py"]


def violations(files: list[Path] | None = None) -> tuple[list[Finding], set[tuple[str, str, str]]]:
    """(findings not covered by CPU_ONLY, CPU_ONLY keys that were used)."""
    out, used = [], set()
    for p in files or scanned_files():
        for f in check_source(p.read_text(), p.relative_to(SRC).as_posix()):
            if f.key in CPU_ONLY:
                used.add(f.key)
            else:
                out.append(f)
    return out, used


# ------------------------------------------------------------------------------------------------ tests
def test_algorithms_create_no_tensor_or_module_on_the_cpu_by_accident():
    found, _ = violations()
    assert not found, ("device hygiene (see this test's docstring; a justified CPU-only call goes into CPU_ONLY with "
                       "its reason):\n" + "\n".join(map(str, found)))


def test_every_cpu_only_exception_is_still_needed():
    _, used = violations()
    stale = sorted(set(CPU_ONLY) - used)
    assert not stale, f"CPU_ONLY entries that match no call any more (remove them): {stale}"


BAD = '''
import numpy as np
import torch
import torch.nn as nn
from torch import zeros as z0

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)           # fine: built in __init__

class Algo:
    def init_server(self):
        return self.ctx.build_model().state_dict()   # fine: the engine moves the state

    def aggregate(self, server, updates, rnd):
        acc = torch.zeros(3)                          # 1: no device
        idx = torch.tensor([1, 2], device="cpu")      # 1: pinned to the CPU
        g = torch.Generator()                         # 1: no device
        a = server["x"].numpy()                       # 2: may be on a GPU
        head = self.ctx.build_model().head            # 3: never moved
        net = Net()                                   # 3: never moved
        fine = torch.ones(2, device=acc.device) + torch.zeros_like(acc) + z0(1, device=acc.device)
        ok = server["x"].cpu().numpy()
        moved = Net()
        moved.to(acc.device)
        also = self.ctx.build_model().to(acc.device)
        return server

    def _builder(self):
        return Net()                                  # fine: a builder; its caller moves it

    def local_update(self, rt, msg, state):
        lin = nn.Linear(3, 3)                         # 3: never moved
        return z0(2)                                  # 1: no device (imported by name)
'''


def test_the_checker_flags_each_rule():
    found = check_source(BAD, "algorithms/bad.py")
    got = sorted((f.line, f.where, f.what.split(" ")[0]) for f in found)
    lines = BAD.splitlines()

    def line_of(marker: str) -> int:
        return next(i + 1 for i, line in enumerate(lines) if marker in line)

    expected = sorted([
        (line_of("acc = torch.zeros(3)"), "Algo.aggregate", "torch.zeros(...)"),
        (line_of('idx = torch.tensor([1, 2], device="cpu")'), "Algo.aggregate", "torch.tensor(...)"),
        (line_of("g = torch.Generator()"), "Algo.aggregate", "torch.Generator(...)"),
        (line_of('a = server["x"].numpy()'), "Algo.aggregate", ".numpy()"),
        (line_of("head = self.ctx.build_model().head"), "Algo.aggregate", "build_model(...)"),
        (line_of("net = Net()"), "Algo.aggregate", "Net(...)"),
        (line_of("lin = nn.Linear(3, 3)"), "Algo.local_update", "Linear(...)"),
        (line_of("return z0(2)"), "Algo.local_update", "torch.zeros(...)"),
    ])
    assert got == expected
    # the same calls with derived devices, moved modules and host copies pass
    fixed = BAD.replace('torch.zeros(3)', 'torch.zeros(3, device=rt_device)') \
        .replace('device="cpu"', 'device=acc.device').replace('torch.Generator()', 'torch.Generator(device=acc.device)') \
        .replace('server["x"].numpy()', 'server["x"].cpu().numpy()') \
        .replace('build_model().head ', 'build_model().head.to(acc.device)') \
        .replace('net = Net()   ', 'net = Net().to(acc.device)') \
        .replace('nn.Linear(3, 3)', 'nn.Linear(3, 3).to(rt.device)').replace('z0(2)', 'z0(2, device=rt.device)')
    assert check_source(fixed, "algorithms/bad.py") == []


@pytest.mark.parametrize("name", ["torch.Generator(device=torch.device('cpu'))", "torch.arange(3, device=None)"])
def test_a_literal_cpu_device_is_not_a_derived_one(name):
    src = f"import torch\ndef f():\n    return {name}\n"
    assert len(check_source(src, "x.py")) == 1
