"""The package's folders are its layers: every import of every module of ahiq/ (at module level and inside
functions) goes to a layer below or the module's own folder, data and nn never import each other, no import
chain comes back to where it started, and the public names stay where users find them."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# Lowest first. A module may import its own folder and the layers below; the shared helpers may import each
# other; data and nn stand side by side and import neither each other nor anything above the shared helpers.
LAYERS = [
    {"ahiq.files", "ahiq.messages", "ahiq.options", "ahiq.lazy", "ahiq.registry"},
    {"ahiq.data", "ahiq.nn"},
    {"ahiq.runtime"},
    {"ahiq.scoring"},
    {"ahiq.engine"},
    {"ahiq.cli", "ahiq.app", "ahiq.__main__", "ahiq"},
]


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / "ahiq").rglob("*.py"))}


def unit(module: str) -> str:
    """The layer member a module belongs to: its folder under ahiq/ (ahiq.nn.zoo: ahiq.nn), or itself."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if unit(module) in members)


def imports(module: str) -> set[str]:
    """The ahiq modules ``module`` imports, anywhere in it (a name from a package that is its submodule
    counts as that submodule)."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import from {'.' * node.level}{node.module or ''}"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {name for name in found if name == "ahiq" or name.startswith("ahiq.")}


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_in_a_layer_and_imports_only_existing_modules():
    for module, imported in GRAPH.items():
        layer(module)
        assert imported <= set(MODULES), f"{module} imports {imported - set(MODULES)}, which do not exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_a_layer_above_or_a_side_folder(module):
    for target in GRAPH[module]:
        if unit(target) == unit(module):
            continue
        assert layer(target) <= layer(module), f"{module} imports {target}, a layer above it"
        if layer(target) == layer(module) and layer(module) == 1:
            pytest.fail(f"{module} imports {target}: data and nn must not depend on each other")


def test_the_runtime_knows_nothing_of_the_model():
    """ahiq.runtime decides how a model runs (device, precision, crops per pass) from what it is given: what a
    crop costs, how to time one; it imports nothing of the network."""
    for module in (m for m in MODULES if unit(m) == "ahiq.runtime"):
        assert not {t for t in GRAPH[module] if unit(t) == "ahiq.nn"}, f"{module} imports {GRAPH[module]}"


def test_no_module_is_past_about_400_lines():
    for module, path in MODULES.items():
        assert len(path.read_text().splitlines()) <= 410, f"{path} has {len(path.read_text().splitlines())} lines"


def test_the_shared_flags_are_declared_once():
    """--debug, --device and --weights: one declaration each (ahiq.cli's parent parsers)."""
    sources = "\n".join(path.read_text() for path in MODULES.values())
    for flag in ("--debug", "--device", "--weights"):
        assert len(re.findall(rf'add_argument\(\s*"{flag}"', sources)) == 1, flag


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_every_layer_is_used_as_documented():
    """A layer's docstring in ahiq/__init__.py names every folder, so the map a reader starts from is true."""
    doc = ast.get_docstring(ast.parse(MODULES["ahiq"].read_text()))
    for members in LAYERS:
        for member in members - {"ahiq", "ahiq.__main__"}:
            assert f"``{member.removeprefix('ahiq.')}``" in doc, f"ahiq/__init__.py does not name {member}"


def test_the_public_names_import_and_the_front_ends_load_no_torch():
    code = ("import sys\n"
            "import ahiq.cli, ahiq.nn.zoo, ahiq.nn.downloads, ahiq.runtime.threads, ahiq.runtime.launch, ahiq.options\n"
            "import ahiq.data, ahiq.data.pairs, ahiq.data.labels, ahiq.runtime.memory, ahiq.scoring.output\n"
            "import ahiq.scoring.onnx_scorer, ahiq.scoring.protocol, ahiq.scoring.cost, ahiq.engine.score_files\n"
            "import ahiq.registry.datasets, ahiq.registry.variants, ahiq.registry.baselines, ahiq.registry.settings\n"
            "import ahiq.registry.released\n"
            "assert 'torch' not in sys.modules, 'torch loaded by a front end'\n"
            "from ahiq import AHIQ, AHIQMetric, Scorer, create_metric, list_models\n"
            "from ahiq.runtime import Runtime, cpu_bf16\n"
            "from ahiq.data import CropPlan, read_labels\n"
            "from ahiq.nn.zoo import RELEASED\n"
            "import ahiq.runtime.device as device\n"
            "assert Runtime is device.Runtime and AHIQ.__module__ == 'ahiq.nn.model' and 'pipal' in RELEASED\n"
            "assert Scorer.__module__ == 'ahiq.scoring.scorer' and create_metric.__module__ == 'ahiq.scoring.metric'\n"
            "assert set(ahiq.__all__) <= set(dir(ahiq)) and {'Runtime', 'cpu_bf16'} <= set(dir(ahiq.runtime))\n"
            "print(sorted(ahiq.__all__))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(["AHIQ", "AHIQMetric", "Scorer", "create_metric", "list_models"])


def test_a_missing_public_name_is_an_attribute_error():
    import ahiq
    import ahiq.runtime

    with pytest.raises(AttributeError, match="module 'ahiq' has no attribute 'Nope'"):
        ahiq.Nope  # noqa: B018
    with pytest.raises(AttributeError, match="module 'ahiq.runtime' has no attribute 'Nope'"):
        ahiq.runtime.Nope  # noqa: B018
