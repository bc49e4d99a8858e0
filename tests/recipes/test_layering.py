"""The recipes sit beside the library: `import randmask` does not load them, and they reach the library only through
its top-level public names (`import randmask`, `from randmask import X`, and the opt-in public modules
`randmask.peft` and `randmask.distributed`; never another submodule or a name with a leading underscore), so the
library can reorganise its internals without breaking the application."""
import ast
import pathlib
import subprocess
import sys

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "randmask" / "recipes"


def test_the_library_does_not_import_the_recipes_nor_peft():
    code = ("import randmask, sys; print(sorted(m for m in sys.modules if m.startswith('randmask.recipes') "
            "or m.split('.')[0] in ('peft', 'trl') or m in ('randmask.peft', 'randmask.distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


OPT_IN = ("randmask.peft", "randmask.distributed")  # public modules that import randmask does not load


def _core(module: str) -> bool:
    return module == "randmask" or (module.startswith("randmask.") and not module.startswith("randmask.recipes"))


def test_the_recipes_use_only_the_public_names_of_the_library():
    found, bad = 0, []
    for path in sorted(RECIPES.glob("*.py")):
        found += 1
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module and _core(node.module):
                if node.module != "randmask" or any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                bad += [f"{where}: import {a.name}" for a in node.names
                        if _core(a.name) and a.name not in ("randmask", *OPT_IN)]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "randmask" and node.attr.startswith("_"):
                bad.append(f"{where}: randmask.{node.attr}")
    assert bad == []
    assert found >= 7  # __init__, cli, data, finetune, models, report, train
