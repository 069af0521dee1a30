"""The Slicer extension tree is complete and consistent, checked without Slicer.

What an Extension Manager install ships is exactly what the CMake files list, so a file missing
from a list is a file missing for users: these tests compare the lists with the tree. They also
check that the module only uses widget names its .ui defines and Slicer API names that exist in
Slicer 5.10 (the oldest Slicer we support, listed in ../shared/slicer_api), and that the library
stays free of Slicer imports.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "AutoNNUNet"
MODULE_FILE = MODULE_DIR / "AutoNNUNet.py"
SLICER_LIB_DIR = MODULE_DIR / "AutoNNUNetSlicerLib"
SELF_TEST_FILE = MODULE_DIR / "Testing" / "Python" / "AutoNNUNetSelfTest.py"
#: Every Python file the extension ships besides the library: the view, its Lib, the self-test.
MODULE_PY_FILES = sorted([MODULE_FILE, SELF_TEST_FILE, *SLICER_LIB_DIR.glob("*.py")])
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AutoNNUNet.ui"
LIBRARY_DIR = ROOT / "AutoNNUNetLib"
SLICER_API = ROOT.parent / "shared" / "slicer_api"
INDEX_ENTRY = ROOT / "Resources" / "ExtensionsIndex" / "AutoNNUNet.json"

#: Capitalized (VTK/MRML-style) methods the module calls on objects whose classes are not in the
#: slicer_api lists: VTK base classes, Slicer application logics. Each is named with its owner so
#: a new unlisted call shows up as a test failure and is looked at.
NON_MRML_METHODS = {
    "IsA": "vtkObject",
    "InsertNextValue": "vtkStringArray",
    "GetNumberOfScalarComponents": "vtkImageData",
    "ShowChartInLayout": "vtkSlicerPlotsLogic",
    "GetImageToWorldMatrix": "vtkOrientedImageData",
    "GetParameter": "vtkMRMLScriptedModuleNode",
}
#: Classes whose methods slicer_api lists (one file per class).
MRML_LISTS = sorted(SLICER_API.glob("vtk*.txt"))


# ---------------------------------------------------------------------------------------------
# helpers


def cmake_list(path: Path, variable: str) -> list[str]:
    """Items of ``set(VARIABLE ...)`` in a CMake file, with ``${MODULE_NAME}``-style names expanded."""
    text = path.read_text()
    names = dict(re.findall(r"set\((\w+)\s+([A-Za-z0-9_]+)\s*\)", text))
    match = re.search(rf"set\({variable}\b(.*?)\)", text, re.S)
    assert match, f"{path.name} has no set({variable} ...)"
    items = []
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        for item in line.split():
            items.append(re.sub(r"\$\{(\w+)\}", lambda m: names[m.group(1)], item))
    return items


def shipped_files(folder: Path, suffixes: tuple[str, ...] | None = None) -> set[str]:
    """Files under ``folder`` (relative, posix), without caches and the CMake file itself."""
    found = set()
    for path in folder.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.name == "CMakeLists.txt":
            continue
        if path.suffix in (".pyc",):
            continue
        if suffixes is None or path.suffix in suffixes:
            found.add(path.relative_to(folder).as_posix())
    return found


def api_names(name: str) -> set[str]:
    return {line.strip() for line in (SLICER_API / name).read_text().splitlines() if line.strip()}


def module_tree(path: Path = MODULE_FILE) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def all_module_trees() -> list[ast.Module]:
    return [module_tree(path) for path in MODULE_PY_FILES]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def ui_widgets() -> dict[str, str]:
    """Widget name -> class in the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


# ---------------------------------------------------------------------------------------------
# CMake lists vs the tree


def test_module_cmake_lists_every_script_and_resource():
    scripts = cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    on_disk = shipped_files(MODULE_DIR)
    listed = set(scripts) | set(resources)
    assert "AutoNNUNet.py" in scripts
    assert {"AutoNNUNetSlicerLib/__init__.py", "Testing/Python/AutoNNUNetSelfTest.py"} <= set(scripts)
    assert {"Resources/UI/AutoNNUNet.ui", "Resources/Icons/AutoNNUNet.png"} <= set(resources)
    assert sorted(on_disk - listed) == [], "files in AutoNNUNet/ that an install would not ship"
    assert sorted(listed - on_disk) == [], "listed files that do not exist (CMake configure fails)"


def test_module_cmake_ships_the_library_metadata_the_install_reads():
    """The pins are read from pyproject.toml (one place); an extension install ships a copy where
    AutoNNUNetSlicerLib.install looks first."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "../pyproject.toml" in text and "${MODULE_NAME}SlicerLib" in text
    assert re.search(r"install\(\s*FILES \$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./pyproject\.toml", text)
    sys.path.insert(0, str(MODULE_DIR))
    from AutoNNUNetSlicerLib import install

    assert install.PYPROJECT_CANDIDATES[0] == SLICER_LIB_DIR / "pyproject.toml"


def test_library_cmake_lists_every_python_file():
    cmake = LIBRARY_DIR / "CMakeLists.txt"
    scripts = cmake_list(cmake, "LIBRARY_PYTHON_SCRIPTS")
    resources = cmake_list(cmake, "LIBRARY_PYTHON_RESOURCES")
    python_files = shipped_files(LIBRARY_DIR, (".py",))
    other_files = shipped_files(LIBRARY_DIR) - python_files
    assert sorted(python_files - set(scripts)) == [], (
        "AutoNNUNetLib .py files missing from AutoNNUNetLib/CMakeLists.txt: an Extension Manager "
        "install would not have them"
    )
    assert sorted(set(scripts) - python_files) == [], "listed library scripts that do not exist"
    assert sorted(other_files - set(resources)) == [], "library data files missing from LIBRARY_PYTHON_RESOURCES"
    text = cmake.read_text()
    # Installed as a package folder next to the module, as Slicer ships DICOMLib.
    assert re.search(r"slicerMacroBuildScriptedModule\(.*?NAME\s+\$\{LIBRARY_NAME\}.*?WITH_SUBDIR.*?\)", text, re.S)
    assert "set(LIBRARY_NAME AutoNNUNetLib)" in text


def test_module_cmake_builds_tests():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S)
    assert macro and "WITH_GENERIC_TESTS" in macro.group(1)
    assert "NAME ${MODULE_NAME}" in macro.group(1)
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+Testing/Python/\$\{MODULE_NAME\}SelfTest\.py\s*\)", text)
    assert "set(MODULE_NAME AutoNNUNet)" in text


def test_top_level_cmake_has_extension_metadata_and_subdirectories():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(AutoNNUNet\)", text, re.M)
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"(.*?)"\)', text, re.S))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_DEPENDS"):
        assert values.get(key), f"{key} missing or empty"
    assert "EXTENSION_SCREENSHOTURLS" in values  # may be empty: no URL rather than a broken one
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert values["EXTENSION_HOMEPAGE"].startswith("https://")
    assert values["EXTENSION_ICONURL"].endswith("Resources/Icons/AutoNNUNet.png")
    assert "5.10" in values["EXTENSION_DESCRIPTION"]  # users must see the minimum Slicer version
    ordered = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(AutoNNUNetLib)",
        "add_subdirectory(AutoNNUNet)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(line) for line in ordered]
    assert all(p >= 0 for p in positions), dict(zip(ordered, positions))
    assert positions == sorted(positions), "the CMake steps are out of order"


RAW_URL = re.compile(r"^https://raw\.githubusercontent\.com/(?P<repo>[^/]+/[^/]+)/(?P<ref>[^/]+)/(?P<path>.+)$")


def test_every_url_in_the_cmake_metadata_points_at_a_file_in_the_tree():
    """The index CI downloads the icon and every screenshot: each must name a file we ship."""
    text = (ROOT / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"(.*?)"\)', text, re.S))
    entry = json.loads(INDEX_ENTRY.read_text())
    repo = entry["scm_url"].removeprefix("https://github.com/").removesuffix(".git")
    urls = [values["EXTENSION_ICONURL"], *values.get("EXTENSION_SCREENSHOTURLS", "").split()]
    for url in urls:
        match = RAW_URL.match(url)
        assert match, f"{url}: not a raw.githubusercontent.com file URL of the repository"
        assert match["repo"] == repo and match["ref"] == entry["scm_revision"], url
        assert (ROOT / match["path"]).is_file(), f"{url} points at {match['path']}, which is not in the tree"
    every_url = re.findall(r"https://[^\s\")]+", text)
    assert [u for u in every_url if u.startswith("https://raw.githubusercontent.com/")] == urls


def test_icons_are_128_pngs_and_identical():
    extension_icon = ROOT / "Resources" / "Icons" / "AutoNNUNet.png"
    module_icon = MODULE_DIR / "Resources" / "Icons" / "AutoNNUNet.png"
    assert png_size(extension_icon) == (128, 128)
    assert png_size(module_icon) == (128, 128)
    assert extension_icon.read_bytes() == module_icon.read_bytes()


def test_license_is_present():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text


# ---------------------------------------------------------------------------------------------
# .ui file


def test_ui_parses_with_qmrmlwidget_root_and_sections():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "AutoNNUNet"
    widgets = ui_widgets()
    sections = {name for name, cls in widgets.items() if cls == "ctkCollapsibleButton"}
    assert {"dataCollapsibleButton", "fingerprintCollapsibleButton", "searchCollapsibleButton",
            "resultsCollapsibleButton", "inferenceCollapsibleButton"} <= sections
    # Every non-Qt class used is declared as a custom widget (else Qt's loader fails).
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert used <= declared, used - declared
    # The runner token is never shown in clear text.
    token = next(w for w in root.iter("widget") if w.get("name") == "remoteTokenLineEdit")
    echo = [p.findtext("enum") for p in token.iter("property") if p.get("name") == "echoMode"]
    assert echo == ["QLineEdit::Password"]


def test_every_widget_name_the_module_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    widgets = ui_widgets()
    assert len(used) > 30  # the scan found the module's widgets
    assert sorted(used - set(widgets)) == []


def _parameter_fields() -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in the module")


def test_ui_parameter_bindings_match_the_parameter_node():
    """Widgets bound with SlicerParameterName name a parameter, and a widget type that can show it."""
    root = ET.parse(UI_FILE).getroot()
    fields = _parameter_fields()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert len(bound) >= 15
    assert sorted(set(bound) - set(fields)) == [], "widgets bound to parameters that do not exist"
    compatible = {
        "QComboBox": ("Choice",),
        "QSpinBox": ("int",),
        "QDoubleSpinBox": ("float",),
        "ctkSliderWidget": ("float",),
        "QLineEdit": ("str",),
        "QCheckBox": ("bool",),
        "ctkPathLineEdit": ("Path",),
        "qMRMLNodeComboBox": ("vtkMRML",),
    }
    for name, widget_class in bound.items():
        annotation = fields[name]
        assert any(token in annotation for token in compatible[widget_class]), (name, widget_class, annotation)
        if widget_class in ("ctkSliderWidget",):
            assert "WithinRange" in annotation, f"{name}: a slider needs a bounded range"


# ---------------------------------------------------------------------------------------------
# ExtensionsIndex entry


def test_extensions_index_entry():
    entry = json.loads(INDEX_ENTRY.read_text())
    assert INDEX_ENTRY.stem == "AutoNNUNet"  # named after the CMake project
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://") and entry["scm_url"].endswith(".git")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry.get("tier") in (1, 3, 5)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    repo = entry["scm_url"].removesuffix(".git")
    assert repo in cmake, "homepage/icon URLs and scm_url point at different repositories"


def test_extensions_index_entry_is_formatted_as_the_index_requires():
    """The index's prettier rule: two-space indent, every array item on its own line, final newline."""
    text = INDEX_ENTRY.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
    assert '"build_dependencies": [\n    "PyTorch"\n  ]' in text


# ---------------------------------------------------------------------------------------------
# module source


@pytest.mark.parametrize("path", MODULE_PY_FILES, ids=lambda p: p.name)
def test_module_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


def test_module_has_the_scripted_module_classes():
    classes = {node.name: node for node in module_tree().body if isinstance(node, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases["AutoNNUNet"] == ["ScriptedLoadableModule"]
    assert bases["AutoNNUNetWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["AutoNNUNetLogic"] == ["ScriptedLoadableModuleLogic", "ModuleSession"]  # actions: session.py
    widget_methods = {n.name for n in classes["AutoNNUNetWidget"].body if isinstance(n, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "initializeParameterNode", "setParameterNode"} <= widget_methods
    # Slicer's "Reload and Test" looks up <module>Test in the module's namespace: it is imported there.
    imported = {alias.name for node in module_tree().body if isinstance(node, ast.ImportFrom)
                and node.module == "AutoNNUNetSelfTest" for alias in node.names}
    assert imported == {"AutoNNUNetTest"}
    test_classes = {n.name: n for n in module_tree(SELF_TEST_FILE).body if isinstance(n, ast.ClassDef)}
    assert [ast.unparse(b) for b in test_classes["AutoNNUNetTest"].bases] == ["ScriptedLoadableModuleTest"]
    test_methods = {n.name for n in test_classes["AutoNNUNetTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest", "test_search_and_segment", "test_geometry_round_trip"} <= test_methods


def test_module_file_is_a_view():
    """The module file holds the module class, its parameter node and the panel's wiring only:
    library rules (requirements, job commands, folder layouts) live in AutoNNUNetSlicerLib."""
    source = MODULE_FILE.read_text()
    assert len(source.splitlines()) < 950  # Qt wiring of six sections; no rules (below)
    for rule in ("subprocess", "Popen", "PIP_REQUIREMENTS", "TORCH_REQUIREMENT", "argv", "cliArguments",
                 "class SearchSettings", "pip_install"):
        assert rule not in source, f"AutoNNUNet.py still holds {rule!r}"


def test_widget_holds_no_library_calls():
    """The Widget calls the Logic and AutoNNUNetSlicerLib; only those touch AutoNNUNetLib."""
    widget = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "AutoNNUNetWidget")
    for node in ast.walk(widget):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert not (module or "").startswith("AutoNNUNetLib"), f"widget imports {module} (line {node.lineno})"


def _slicer_util_names(tree: ast.Module) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "slicer.util":
            used.add(node.attr)
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
            used |= {alias.name for alias in node.names if alias.name != "VTKObservationMixin"}
    return used


def test_slicer_util_names_exist_in_slicer_5_10():
    known = api_names("slicer.util.txt")
    used = set().union(*(_slicer_util_names(tree) for tree in all_module_trees()))
    assert {"loadUI", "childWidgetVariables", "arrayFromVolume", "pip_install", "updateTableFromArray"} <= used
    assert sorted(used - known) == [], "slicer.util names that Slicer 5.10 does not have"


def test_no_slicer_5_12_only_api():
    for path in MODULE_PY_FILES:
        assert "slicer.packaging" not in path.read_text(), path.name
        # 5.10's launchConsoleProcess has no non-blocking arguments; jobs run through LocalJob.
        for node in ast.walk(module_tree(path)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("launchConsoleProcess"):
                assert {k.arg for k in node.keywords} <= {"useStartupEnvironment", "updateEnvironment", "cwd"}


def test_scripted_module_and_parameter_wrapper_names_exist():
    scripted = {line.split(".")[0] for line in api_names("slicer.ScriptedLoadableModule.txt")}
    wrapper = api_names("slicer.parameterNodeWrapper.txt")
    for tree in all_module_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "slicer.ScriptedLoadableModule":
                assert {a.name for a in node.names} <= scripted
            if isinstance(node, ast.ImportFrom) and node.module == "slicer.parameterNodeWrapper":
                assert {a.name for a in node.names} <= wrapper
    methods = {line.split(".", 1)[1] for line in api_names("slicer.ScriptedLoadableModule.txt") if "." in line}
    # Methods the module calls on its own base classes exist there.
    for called in ("resourcePath", "getParameterNode", "delayDisplay"):
        assert called in methods


def _capitalized_calls(tree: ast.Module) -> set[str]:
    """VTK/MRML-style method calls (capitalized), skipping ``module.Class(...)`` constructions."""
    modules = {"slicer"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules |= {alias.asname or alias.name for alias in node.names if alias.name.islower()}
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, ast.unparse(node.func.value)
            # Capitalized method names are VTK/MRML (Qt and Python use lowerCamel/snake case).
            if name[:1].isupper() and owner not in modules:
                called.add(name)
    return called


def test_mrml_method_names_exist_in_slicer_5_10():
    """Every VTK/MRML-style method the module, its Lib and its self-test call exists on some
    listed MRML/segmentation class."""
    known: set[str] = set()
    for path in MRML_LISTS:
        known |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    called = set().union(*(_capitalized_calls(tree) for tree in all_module_trees()))
    assert {"GetIJKToRASDirectionMatrix", "ExportSegmentsToLabelmapNode", "AddEmptySegment", "SetLineStyle",
            "SetAttribute", "GetAttribute"} <= called
    unknown = sorted(called - known - set(NON_MRML_METHODS))
    assert unknown == [], "methods not found in ../shared/slicer_api (Slicer 5.10)"


def test_plot_series_enum_names_exist():
    """The chart's styles name vtkMRMLPlotSeriesNode enums that a scatter series understands."""
    sys.path.insert(0, str(MODULE_DIR))
    from AutoNNUNetSlicerLib import chart

    known = {"PlotTypeScatter", "PlotTypeLine", "PlotTypeBar", "LineStyleNone", "LineStyleSolid", "LineStyleDash",
             "MarkerStyleCircle", "MarkerStyleSquare", "MarkerStyleNone", "MarkerStyleCross"}
    for style in chart.SERIES:
        assert {f"PlotType{style.plot_type}", f"LineStyle{style.line_style}", f"MarkerStyle{style.marker_style}"} <= known
    assert all(style.plot_type != "Line" for style in chart.SERIES)
    for tree in all_module_trees():  # a line series is drawn against the row index, not the X column
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "PlotTypeLine"]
    for method in ("SetPlotType", "SetLineStyle", "SetMarkerStyle"):
        assert method in api_names("vtkMRMLPlotSeriesNode.txt")


def test_module_does_not_touch_slicer_environment():
    """Jobs get their own environment; Slicer's os.environ is never written."""
    for tree in all_module_trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    assert "os.environ" not in ast.unparse(target), f"line {node.lineno} writes os.environ"
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.update", "os.environ.setdefault",
                                                                           "os.putenv", "os.environ.pop"):
                raise AssertionError(f"line {node.lineno} changes Slicer's environment")


# ---------------------------------------------------------------------------------------------
# AutoNNUNetSlicerLib: importable without Slicer, Slicer calls only inside functions

SLICER_MODULES = {"slicer", "qt", "vtk", "ctk", "PythonQt", "mrml", "vtkSegmentationCore", "PyTorchUtils"}


@pytest.mark.parametrize("path", sorted(SLICER_LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_slicer_lib_imports_slicer_only_inside_functions(path):
    tree = module_tree(path)
    for node in tree.body:  # what runs at import time: module level and class bodies, not functions
        for inner in node.body if isinstance(node, ast.ClassDef) else [node]:
            if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = []
            if isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                names = [inner.module]
            for name in names:
                assert name.split(".")[0] not in SLICER_MODULES, f"{path.name}:{inner.lineno} imports {name} at import time"


def test_slicer_lib_imports_in_a_python_without_slicer():
    """Every submodule imports in a fresh interpreter where slicer, qt and vtk cannot be imported."""
    names = sorted(p.stem for p in SLICER_LIB_DIR.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(SLICER_MODULES)!r}: raise ImportError('no ' + name + ' here')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        f"for name in {names!r}: importlib.import_module('AutoNNUNetSlicerLib.' + name)\n"
        "heavy = sorted(m for m in ('torch', 'nnunetv2', 'neps') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_no_platform_lock_import_outside_the_lock_helper():
    """fcntl / msvcrt exist on one platform each: only files.file_lock (filelock) may decide."""
    lock_helper = ROOT / "AutoNNUNetLib" / "files.py"
    for path in [*sorted((ROOT / "AutoNNUNetLib").rglob("*.py")), *MODULE_PY_FILES]:
        if path == lock_helper:
            continue
        for node in ast.walk(module_tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("fcntl", "msvcrt"), f"{path}:{node.lineno} imports {name}"


def test_module_starts_no_process_of_its_own():
    """Local work runs as jobs.LocalJob (no console window on Windows, a graceful stop before the
    kill, re-attach after a restart): the module and its Lib never start a process themselves."""
    for path in MODULE_PY_FILES:
        for node in ast.walk(module_tree(path)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("subprocess", "multiprocessing") for n in names), path.name
            if isinstance(node, ast.Call):
                assert ast.unparse(node.func) not in ("os.system", "os.popen", "os.spawnv", "os.startfile"), path.name


# ---------------------------------------------------------------------------------------------
# dependencies: the pins in one place


def test_torch_requirement_is_the_one_of_the_library_metadata():
    import tomllib

    sys.path.insert(0, str(MODULE_DIR))
    from AutoNNUNetSlicerLib import install

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d for d in dependencies if re.match(r"torch\b", d)]
    assert install.torch_requirement() == torch[0]
    assert install.torch_version_specifier() == torch[0].removeprefix("torch").strip()
    pip = install.pip_requirements()
    assert "nnunetv2" in " ".join(pip) and not any(re.match(r"(torch|SimpleITK|numpy)\b", r) for r in pip)
    # What the library needs from torch: torch.serialization.safe_globals (2.5) and nnunetv2's
    # exclusion of 2.9.*; an install that resolves outside this range fails later, confusingly.
    from packaging.specifiers import SpecifierSet

    allowed = SpecifierSet(install.torch_version_specifier())
    assert "2.6.0" in allowed and "2.4.1" not in allowed and "2.9.1" not in allowed


def test_no_version_pin_is_written_by_hand_in_the_module():
    for path in MODULE_PY_FILES:
        text = path.read_text()
        for pinned in ("torch>=", "nnunetv2>=", "neural-pipeline-search>=", "requests>="):
            assert pinned not in text, f"{path.name} repeats the pin {pinned!r}: read it from pyproject.toml"


def test_torch_goes_through_pytorch_utils_with_the_derived_requirement():
    tree = module_tree(SLICER_LIB_DIR / "install.py")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(".installTorch")]
    assert len(calls) == 1
    keywords = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    assert keywords == {"askConfirmation": "False", "torchVersionRequirement": "version_specifier"}
    source = ast.unparse(tree)
    assert "install_torch(torch_version_specifier(requirements))" in source


def test_pytorch_extension_is_installed_without_a_restart_of_its_own():
    """restart=False (the second argument in Slicer 5.10's PythonQt signature); the module asks once."""
    tree = module_tree(SLICER_LIB_DIR / "install.py")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(".installExtensionFromServer")]
    assert len(calls) == 1 and len(calls[0].args) == 2
    assert isinstance(calls[0].args[1], ast.Constant) and calls[0].args[1].value is False


# ---------------------------------------------------------------------------------------------
# the self-test


def test_self_test_skips_without_dependencies_and_scores_both_classes():
    source = SELF_TEST_FILE.read_text()
    tree = module_tree(SELF_TEST_FILE)
    test = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "test_search_and_segment")
    body = ast.unparse(test)
    assert "self.skipTest(" in body  # unittest reports a skip with the reason, not a failure
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    assert "missingDependencies" in ast.unparse(run)
    # Both classes are scored: the centred sphere and the off-centre box (which an axis flip moves).
    assert '("Sphere", 1), ("Box", 2)' in source
    # The output node's own stored geometry is compared, not a re-export onto the input's grid.
    assert "GetBinaryLabelmapInternalRepresentation" in body or "_assertOnReferenceGrid" in body
    assert "ExportSegmentsToLabelmapNode" not in body


# ---------------------------------------------------------------------------------------------
# library stays Slicer-free


@pytest.mark.parametrize("path", sorted(LIBRARY_DIR.rglob("*.py")), ids=lambda p: p.name)
def test_library_never_imports_slicer_qt_vtk_ctk(path):
    forbidden = {"slicer", "qt", "vtk", "ctk", "PythonQt", "mrml", "vtkSegmentationCore"}
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        for name in names:
            assert name.split(".")[0] not in forbidden, f"{path.name}:{node.lineno} imports {name}"
