"""The package layout is an architecture rule, checked here: each room of c2t_fast imports only the rooms
below it (kernels -> hf -> decoding -> training -> bench -> cli), and only c2t_fast.hf imports
transformers (only wisca_fast.schedule, for the Trainer callback, in wisca_fast)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = {"kernels": 0, "hf": 1, "decoding": 2, "training": 3, "bench": 4, "cli": 5}


def _modules(package):
    base = os.path.join(ROOT, package)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(module, path):
    """Absolute names of every module ``path`` imports, function-level imports included."""
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_pkg else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name
            for alias in node.names:  # `from . import ops` imports the module c2t_fast.ops
                yield f"{name}.{alias.name}"


def _room(name):
    parts = name.split(".")
    if parts[0] != "c2t_fast" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


C2T_MODULES = sorted(_modules("c2t_fast"))


@pytest.mark.parametrize("module,path", C2T_MODULES, ids=[m for m, _ in C2T_MODULES])
def test_each_room_imports_only_the_rooms_below_it(module, path):
    own = _room(module)
    if own is None:  # the package's __init__ (the public re-exports) and the compiled _C
        return
    for name in _imports(module, path):
        other = _room(name)
        if other is not None and other != own:
            assert RANK[other] < RANK[own], f"{module} ({own}) imports {name} ({other}), a room above it"


@pytest.mark.parametrize("package,allowed", [("c2t_fast", ("c2t_fast.hf",)), ("wisca_fast", ("wisca_fast.schedule",))])
def test_transformers_is_known_in_one_place(package, allowed):
    for module, path in _modules(package):
        for name in _imports(module, path):
            if name.split(".")[0] == "transformers":
                assert module.startswith(allowed), f"{module} imports {name}; only {allowed} may import transformers"


def test_the_checks_see_a_violation(tmp_path):
    """The walker resolves relative, nested and `from . import x` imports (so the tests above can fail)."""
    path = tmp_path / "engine.py"
    path.write_text("def f():\n    from ..training import draft_head\n    from . import bench\n    import transformers\n")
    names = set(_imports("c2t_fast.decoding.engine", str(path)))
    assert {"c2t_fast.training", "c2t_fast.training.draft_head", "c2t_fast.decoding.bench", "transformers"} <= names
    assert RANK[_room("c2t_fast.training.draft_head")] > RANK["decoding"]


def test_public_names_and_the_ops_door_keep_their_paths():
    import c2t_fast
    import c2t_fast.ops
    import c2t_fast.reference
    from c2t_fast.decoding import engine, strategies
    from c2t_fast.kernels import ops, reference
    from c2t_fast.ops import score_children

    assert c2t_fast.ops is ops and c2t_fast.reference is reference and score_children is ops.score_children
    assert c2t_fast.SpeculativeGenerator is engine.SpeculativeGenerator and c2t_fast.C2T is strategies.C2T
    for name in c2t_fast.__all__:
        assert getattr(c2t_fast, name) is not None


def test_every_package_directory_is_in_the_wheel():
    """A subpackage missing from pyproject's list imports in an editable install and vanishes from a wheel."""
    import re

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    listed = set(re.findall(r'"([A-Za-z0-9_.]+)"', re.search(r"^packages = \[(.*?)\]", text, re.M | re.S).group(1)))
    for package in ("c2t_fast", "wisca_fast"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            if "__init__.py" in files:
                name = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
                assert name in listed, f"{name} is not in pyproject.toml's [tool.setuptools] packages"
    assert "c2t_fast.kernels.triton" in listed


# Inside decoding, the drafts room and the cost room sit below the engine and the strategies: a draft or a
# source never reaches up into what grows, sizes or verifies its tree.
INNER = {"c2t_fast.decoding.drafts": ("c2t_fast.decoding.drafts",),
         "c2t_fast.decoding.cost": ("c2t_fast.decoding.cost", "c2t_fast.decoding.drafts")}


@pytest.mark.parametrize("room", sorted(INNER))
def test_the_inner_rooms_of_decoding_import_only_below_them(room):
    mods = [(m, p) for m, p in C2T_MODULES if m == room or m.startswith(room + ".")]
    assert mods, f"{room} has no modules"
    for module, path in mods:
        for name in _imports(module, path):
            if name.startswith("c2t_fast.decoding") and name != "c2t_fast.decoding":
                assert name.startswith(INNER[room]), f"{module} imports {name}, outside {INNER[room]}"


def test_one_kernels_module_per_op_family_behind_the_door():
    """Each op family has its own module and the door re-exports its public call (the same object)."""
    import importlib

    from c2t_fast.kernels import ops

    for family, names in {"tree_ops": ("build_tree", "prune_tree", "rerank_tree", "verify_greedy", "verify_sample",
                                       "compact_kv"),
                          "tree_attention": ("tree_attention",), "score_children": ("score_children",),
                          "skinny_linear": ("skinny_linear",), "decode_attention": ("decode_attention",)}.items():
        mod = importlib.import_module(f"c2t_fast.kernels.{family}")
        for n in names:
            assert getattr(ops, n) is getattr(mod, n), f"ops.{n} is not kernels.{family}.{n}"
    schemas = open(os.path.join(ROOT, "csrc", "c2t", "ops.cpp")).read()
    for f in os.listdir(os.path.join(ROOT, "csrc", "c2t")):
        if f != "ops.cpp" and f.endswith(".cpp"):
            assert "m.def(" not in open(os.path.join(ROOT, "csrc", "c2t", f)).read(), f"a schema outside ops.cpp: {f}"
    for op in ("tree_attention", "score_children", "_score_tail", "skinny_linear", "decode_attention", "build_tree"):
        assert f'm.def("{op}(' in schemas
