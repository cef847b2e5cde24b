"""tools/ (the benchmarks and the GPU check) sits beside the library, not in it: no module of kd imports tools, and
no tool reaches a private name of kd, so the library's internals can change without breaking a tool unseen."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def private(name: str) -> bool:
    """A leading underscore that is no dunder (__init__, __version__ are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the tree, `from m import a` counted as m and m.a."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def kd_bindings(tree: ast.AST) -> set[str]:
    """The names an import from kd binds in the module: `kd`, a module (records) or an object (TeacherCache)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names
                      if alias.name.split(".")[0] == "kd"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kd":
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def private_kd_names(source: str) -> list[str]:
    """Each private name of kd the source imports or reaches, as 'line: what'."""
    tree = ast.parse(source)
    found = [f"{line}: import {module}" for line, module in imported_modules(tree)
             if module.split(".")[0] == "kd" and any(private(part) for part in module.split("."))]
    bound = kd_bindings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and private(node.args[1].value)):
            root = node.args[0]
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda hit: int(hit.split(":")[0]))  # ast.walk goes breadth first: in line order


def tools_imports(source: str) -> list[str]:
    """Each import of the tools package in the source, as 'line: import module'."""
    return [f"{line}: import {module}" for line, module in imported_modules(ast.parse(source))
            if module.split(".")[0] == "tools"]


def sources(folder: str) -> dict[str, str]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python file under {folder}/"
    return {str(path.relative_to(REPO)): path.read_text() for path in files}


def test_no_module_of_kd_imports_tools():
    found = {path: hits for path, source in sources("kd").items() if (hits := tools_imports(source))}
    assert found == {}, f"kd/ must not depend on tools/ (move the code into kd, public): {found}"


def test_no_tool_imports_or_reaches_a_private_name_of_kd():
    tools = sources("tools")
    assert {"tools/bench.py", "tools/bench_data.py", "tools/bench_topk.py", "tools/gpu_check.py"} <= set(tools)
    found = {path: hits for path, source in tools.items() if (hits := private_kd_names(source))}
    assert found == {}, f"tools use kd's public entry points only (add one to kd): {found}"


def test_the_scans_find_what_they_forbid():
    """The two tests above cannot pass by finding nothing: each form of the forbidden use is found."""
    planted = "\n".join([
        "import kd.config", "import kd.records as r", "from kd import records, engine as e",
        "from kd.teacher_cache import TeacherCache", "from kd.records import _synchronize",
        "import kd._hidden", "records._synchronize(device)", "kd.records._synchronize(device)",
        "r._synchronize(device)", "e._stderr_is_terminal()", "TeacherCache._path", "getattr(records, '_x')",
        "records.synchronize(device)", "records.__name__", "other._private", "torch.cuda._lazy_init()",
    ])
    assert private_kd_names(planted) == [
        "5: import kd.records._synchronize", "6: import kd._hidden", "7: records._synchronize",
        "8: kd.records._synchronize", "9: r._synchronize", "10: e._stderr_is_terminal", "11: TeacherCache._path",
        "12: getattr(records, '_x')",
    ]
    planted = "import tools\nimport tools.bench as b\nfrom tools import gpu_check\nfrom tools.bench import main\n"
    assert tools_imports(planted + "import toolsmith\nfrom kd import tools_like\n") == [
        "1: import tools", "2: import tools.bench", "3: import tools", "3: import tools.gpu_check",
        "4: import tools.bench", "4: import tools.bench.main",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["bench", "gpu_check"])
def test_a_tool_runs_as_a_file(tool):
    """A subprocess: only a fresh interpreter shows what `python tools/X.py` finds on sys.path (its own folder, not
    the repository root that `python -m tools.X` and this test process have)."""
    proc = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m tools.{tool}"), proc.stdout[:200]
