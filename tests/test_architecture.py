"""The shape of the code, checked: layers import only downwards, no import cycles, no imports hidden inside
functions (except the few listed with their reason), no method hooks looked up by name, small files,
and a command line that starts without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "slimtune"

# Each layer may import itself and the layers before it, never one after it.
LAYERS = [
    ("foundation", ["slimtune.errors", "slimtune.compat", "slimtune.config"]),
    ("core", ["slimtune.core"]),
    ("quantization", ["slimtune.quant"]),
    ("kernels and optimizers", ["slimtune.perf.kernels", "slimtune.optim"]),
    ("methods", ["slimtune.methods", "slimtune.adapterhub.blocks", "slimtune.adapterhub.modules",
                 "slimtune.adapterhub.layers", "slimtune.adapterhub.sites", "slimtune.adapterhub.format",
                 "slimtune.adapterhub.initial"]),
    ("adapter operations", ["slimtune.lifecycle", "slimtune.adapter_files", "slimtune.adapter_keys", "slimtune.report",
                            "slimtune.peft_conversion",
                            "slimtune.combination",
                            "slimtune.mixed_batch", "slimtune.export", "slimtune.perf", "slimtune.gguf_export",
                            "slimtune.gguf_quants", "slimtune.adapterhub", "slimtune.serving"]),
    ("training", ["slimtune.train", "slimtune.estimate", "slimtune.distributed"]),
    ("command line", ["slimtune.cli", "slimtune.__main__", "slimtune"]),
]

# Imports inside functions that are there on purpose, each with its reason.
ALLOWED_LAZY_IMPORTS = {
    "slimtune.cli": "the command line imports its commands on use, so `slimtune --help` starts without torch",
    "slimtune.perf.kernels": "triton is optional (GPU machines; Triton's interpreter in CPU tests): imported on use",
}

# The method contract's steps: never looked up by name (getattr/hasattr) — they are methods of Method.
HOOK_NAMES = {"inject_into", "check_model", "set_active", "set_disabled", "merge", "unmerge", "remove_from",
              "adapter_tensors", "to_peft_dict", "saved_modules_prefix", "param_groups", "after_optimizer_step",
              "rewrite_inputs", "rewrite_encoder_inputs", "check", "add", "remove", "saved_config",
              "bundled_adapters"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = _modules()[module].name == "__init__.py"
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module, inside_functions: bool) -> set[str]:
    """slimtune modules imported at module level (or, with ``inside_functions``, inside functions)."""
    found: set[str] = set()
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(node) for fn in functions for node in ast.walk(fn) if node is not fn}
    type_checking = {id(node) for top in tree.body if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(
        top.test) for node in ast.walk(top)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_checking:
            continue
        if (id(node) in nested) != inside_functions:
            continue
        known = _modules()
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:  # `from slimtune.x import y`: the module slimtune.x.y if there is one, else a name of slimtune.x
            base = _resolve(module, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found |= {n for n in names if n in known and n != module}
    return found


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m, ast.parse(p.read_text()), inside_functions=False) for m, p in _modules().items()}


def _layer(module: str) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py; add it to LAYERS"
    return best[1]


def test_layers_import_only_downwards():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_no_imports_inside_functions_except_the_listed_ones():
    hidden = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        lazy = sorted({f"{fn.name}: {ast.unparse(node)}" for fn in functions for node in ast.walk(fn)
                       if isinstance(node, (ast.Import, ast.ImportFrom))})
        if lazy and not any(module == m or module.startswith(m + ".") for m in ALLOWED_LAZY_IMPORTS):
            hidden[module] = lazy
    assert not hidden, hidden


def test_method_hooks_are_never_looked_up_by_name():
    lookups = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            lookup = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr")
            if lookup and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                    node.args[1].value in HOOK_NAMES:
                lookups.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not lookups, lookups


def test_files_stay_small():
    large = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not large, f"split these by concern (house style: ≤ ~400 lines): {large}"


def test_command_line_help_starts_fast_without_torch():
    code = ("import sys, time; t = time.perf_counter(); from slimtune.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.perf_counter() - t)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    marker, seconds = out.strip().splitlines()[-1].split()
    assert marker == "NO-TORCH", "slimtune --help imported torch"
    assert float(seconds) < 1.0, f"slimtune --help took {float(seconds):.2f} s (interpreter start aside: {wall:.2f} s)"


@pytest.mark.parametrize("old, new", [("inject", "add_adapter"), ("set_active_adapters", "set_adapter"),
                                      ("merge", "merge_adapter"), ("unmerge", "unmerge_adapter")])
def test_renamed_public_names_still_work_and_warn(old, new):
    import slimtune

    with pytest.warns(DeprecationWarning, match=f"slimtune.{old} is deprecated; use slimtune.{new}"):
        alias = getattr(slimtune, old)
    assert alias is getattr(slimtune, new)


def test_every_public_name_resolves():
    import slimtune

    for name in slimtune.__all__:
        assert getattr(slimtune, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slimtune.nope  # noqa: B018
