"""The package's layers (README, "Code map"; docs/method.md §1): every import inside minicirc/, at module level or
inside a function, goes to the module's own layer or one below it, so the import graph has no cycle through the
layers and the library never reaches into the experiments."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minicirc"

# Lowest first. A module may import from its own layer and those before it.
LAYERS = [
    {"errors", "hashing", "files", "hub", "data", "metrics", "rows", "ops", "model", "sae"},
    {"circuit", "attribution", "evaluation", "explain", "explain_cache", "viz", "viewer"},
    {"experiments"},
    {"cli", "__main__", "__init__"},
]


def layer_of(top):
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imported_tops(path):
    """The top-level minicirc module (minicirc.<top>) of every package import in a file."""
    rel = path.relative_to(PACKAGE)
    package = list(rel.parts[:-1])            # the file's package, below minicirc
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                yield parts[0], node.lineno
            else:                              # from . import x, y at the package root
                for alias in node.names:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minicirc."):
            yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minicirc."):
                    yield alias.name.split(".")[1], node.lineno


def test_every_import_goes_to_the_same_layer_or_below():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    wrong = []
    for path in files:
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        for top, line in imported_tops(path):
            if top.startswith("_C"):          # the compiled extension, loaded by ops.py
                continue
            if layer_of(top) > layer_of(own):
                wrong.append(f"{rel}:{line} imports minicirc.{top}")
    assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_the_experiments():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("experiments", "cli.py", "__main__.py"):
            continue
        assert "experiments" not in {top for top, _ in imported_tops(path)}, rel


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """A file of the lowest layer importing the experiments is reported (the test above can fail)."""
    fake = tmp_path / "minicirc"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("def f():\n    from ..experiments import demo\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert [t for t, _ in imported_tops(fake / "model" / "bad.py")] == ["experiments"]
    assert layer_of("experiments") > layer_of("model")
