"""The shape the code keeps (docs/design.md): no function of the package, the launch scripts or
the GPU scripts longer than a screen."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60  # lines, decorators and docstring included


def test_no_function_is_longer_than_a_screen():
    long = []
    for folder in ("mpc_dist", "launch", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LIMIT:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, "split these functions:\n" + "\n".join(long)
