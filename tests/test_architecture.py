"""Imports inside functions are the exception: each block says why it is lazy (issue 13).

import-linter (run by `make test`) checks the direction of imports; this checks the other half of
the rule: a function-level import is there because a heavy or optional dependency must not load
until the code that needs it runs, and the block says so in a `# lazy: ...` comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "relaydiff"


def unexplained_lazy_imports(root: Path = SRC) -> list[str]:
    """``file:line`` of each function-level import block without a ``# lazy:`` reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for body in _bodies(func):
                block: list[ast.stmt] = []
                for stmt in [*body, None]:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        block.append(stmt)
                        continue
                    if block and not _explained(block, lines):
                        found.append(f"{path.relative_to(root.parent)}:{block[0].lineno}")
                    block = []
    return found


def _bodies(func: ast.AST):
    """Statement lists directly in ``func`` (its body and nested if/try/with/for blocks, not nested defs)."""
    stack = [func]
    while stack:
        node = stack.pop()
        for name in ("body", "orelse", "finalbody", "handlers"):
            seq = getattr(node, name, None)
            if not isinstance(seq, list):
                continue
            stmts = [s for s in seq if isinstance(s, ast.stmt)]
            if stmts:
                yield stmts
            stack.extend(s for s in seq if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))


def _explained(block: list[ast.stmt], lines: list[str]) -> bool:
    first, last = block[0].lineno, block[-1].end_lineno or block[-1].lineno
    above = lines[first - 2].strip() if first >= 2 else ""
    return above.startswith("# lazy") or any("# lazy" in lines[i - 1] for i in range(first, last + 1))


def test_every_function_level_import_says_why_it_is_lazy():
    missing = unexplained_lazy_imports()
    assert not missing, f"{len(missing)} function-level import blocks without a '# lazy: reason' comment: {missing}"


def test_the_checker_finds_an_unexplained_import_and_accepts_an_explained_one(tmp_path):
    pkg = tmp_path / "relaydiff"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    import json\n    return json\n")
    (pkg / "b.py").write_text("def f():\n    # lazy: only this command needs it\n    import json\n    import csv\n"
                              "    return json, csv\n\n\ndef g():\n    try:\n        import zstandard  # lazy: optional\n"
                              "    except ImportError:\n        return None\n")
    assert unexplained_lazy_imports(pkg) == ["relaydiff/a.py:2"]


def test_the_command_line_starts_without_torch():
    """`relaydiff --help` must be quick: every command loads torch and the models when it runs."""
    import subprocess
    import sys

    code = "import sys, relaydiff.cli; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
