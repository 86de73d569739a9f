"""The package's layers, as README's layout section states them: every ``ode_lm`` import
points to an earlier layer (names in one layer do not import each other)."""

import ast

from tests.conftest import REPO

LAYERS = (("errors",), ("paths",), ("config",), ("data", "nn", "ode"), ("models",), ("generate", "train"),
          ("ablate", "interop"), ("analyze",), ("cli",))


def imports_between_units():
    """``(importer, imported, "file:line")`` for every import of one ode_lm unit by another."""
    root = REPO / "ode_lm"
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        unit = parts[0] if parts[0] != "__init__" else None
        package = ["ode_lm", *parts[:-1]]  # what a relative import starts from
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                names = [".".join([*base, node.module] if node.module else base)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = name.split(".")
                if target[0] == "ode_lm" and len(target) > 1 and unit and target[1] != unit:
                    yield unit, target[1], f"{path.relative_to(REPO)}:{node.lineno}"


def test_every_import_points_to_an_earlier_layer():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    units = {p.stem if p.is_file() else p.name for p in (REPO / "ode_lm").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(layer), "README's layers and ode_lm's modules differ"
    found = list(imports_between_units())
    assert any(src == "cli" for src, _, _ in found)  # the scan sees function-local imports too
    wrong = [f"{where}: {src} imports {dst}" for src, dst, where in found
             if layer[dst] >= layer[src]]
    assert not wrong, "\n".join(wrong)
