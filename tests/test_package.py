"""Rules that hold across the whole package, read from its source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "planet_batch"


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `torch.NAME` (or of NAME imported from torch) in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        direct = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
                  for a in n.names if a.name == name}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name and isinstance(f.value, ast.Name)
                    and f.value.id == "torch") or (isinstance(f, ast.Name) and f.id in direct):
                found.append((path, node))
    return found


def test_every_torch_load_refuses_pickled_objects():
    """A checkpoint, stage file, export or weights file is tensors and plain data: `weights_only=True` everywhere,
    so a crafted file can never run code when it is loaded."""
    loads = calls("load")
    assert len(loads) >= 4, loads  # export, stage files, checkpoints, weights files
    unsafe = [f"{p.relative_to(PACKAGE.parent)}:{c.lineno}" for p, c in loads
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in c.keywords)]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


def test_every_test_docs_reliability_names_exists():
    """docs/reliability.md's last column names the tests that prove each row (`file::test`, then `::test` for more
    of the same file): each must be a test of that file."""
    import re

    text = (PACKAGE.parent / "docs" / "reliability.md").read_text()
    named, missing, current = 0, [], None
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?(?:\[[\w-]+\])?`", text):
        current = m.group(1) or current
        if m.group(2):
            named += 1
            if f"def {m.group(2)}(" not in (PACKAGE.parent / current).read_text():
                missing.append(f"{current}::{m.group(2)}")
    assert named > 30 and missing == [], missing
