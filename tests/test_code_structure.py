"""The code's shape, checked like its behaviour: short parameter lists in train/, metric keys and imports
that a newcomer can follow, and a validate that needs neither torch nor Ray Train."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from rayalign import metrics

PACKAGE = REPO / "platform" / "rayalign"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
            yield node.name, [n for n in names if n not in ("self", "cls")]


def test_no_function_in_train_takes_more_than_four_parameters():
    long = {
        f"{path.name}:{name}": params
        for path in sorted((PACKAGE / "train").glob("*.py"))
        for name, params in _functions(path)
        if len(params) > 4
    }
    assert not long, long


def test_no_test_or_bench_reaches_into_the_workers_private_names():
    reaching = []
    for path in [*REPO.glob("tests/**/*.py"), *REPO.glob("bench/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rayalign.train.worker":
                reaching += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not reaching, reaching


def test_the_packing_bench_calls_the_training_step():
    tree = ast.parse((REPO / "bench" / "packing.py").read_text())
    imported = {
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "rayalign.train.step"
        for a in node.names
    }
    called = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert "PreferenceStep" in imported and {"score", "micro_batches"} <= called


# Keys that are also everyday words (a config section named loss, a progress bar's unit "step") count only
# where a row is read or written: a subscript, a dict key, an `in` test.
_WORD_KEYS = {metrics.LOSS, metrics.STEP, metrics.EPOCH, metrics.LR}


def _metric_literals(path: Path) -> list[str]:
    named = {
        value
        for key, value in vars(metrics).items()
        if key.isupper() and isinstance(value, str) and value not in _WORD_KEYS
    }
    named.discard(metrics.EVAL_PREFIX)
    tree = ast.parse(path.read_text())
    found = []
    row_places = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            row_places.add(id(node.slice))
        elif isinstance(node, ast.Dict):
            row_places.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            row_places.add(id(node.left))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        text = node.value
        if text in named or text.startswith(metrics.EVAL_PREFIX) or (text in _WORD_KEYS and id(node) in row_places):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text!r}")
    return found


def test_metric_keys_are_written_only_in_the_metrics_module():
    sources = [p for p in [*PACKAGE.rglob("*.py"), *REPO.glob("jobs/*.py")] if p != PACKAGE / "metrics.py"]
    literals = [hit for path in sources for hit in _metric_literals(path)]
    assert not literals, "\n".join(literals)


def _module_imports(path: Path, module: str) -> set[str]:
    """The rayalign modules ``module`` imports at its top level (``if TYPE_CHECKING:`` blocks included)."""
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If):
            body += node.body + node.orelse
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("rayalign")}


def test_no_import_cycle_type_checking_included():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {
        name: {m for m in _module_imports(path, name) if m in modules and m != name} for name, path in modules.items()
    }
    cycles, done = [], set()

    def visit(name, trail):
        if name in trail:
            cycles.append(" -> ".join(trail[trail.index(name) :] + [name]))
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, cycles


def test_validate_and_the_data_tasks_need_neither_torch_nor_ray_train():
    """What `rayalign validate` imports to read, count and plan the steps, and the modules whose functions
    Ray Data tasks run (read, filter, split, reference-store look-up): each new worker process that runs
    such a task imports the function's module, and torch alone costs it a second or more of CPU."""
    probe = (
        "import sys; import rayalign.cli; from rayalign.data.stage import prepare_data; "
        "from rayalign.data.records import count_training_pairs; from rayalign.train.steps import step_plan; "
        "import rayalign.data.reading, rayalign.reference.store; "
        "print(sorted(m for m in ('torch', 'ray.train', 'deepspeed') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
