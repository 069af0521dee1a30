"""The module's dependencies: which versions (read from the library's own metadata) and their install.

The pins live in one place, the library's ``pyproject.toml`` (``[project] dependencies``). A source
checkout reads it from the repository; an Extension Manager install ships a copy next to this file
(AutoNNUNet/CMakeLists.txt copies it at build time), and a pip-installed library answers through
``importlib.metadata``. Nothing here repeats a version by hand.

How each dependency arrives (DESIGN.md section 5):

- torch only through the PyTorch extension (``PyTorchUtils.installTorch`` picks the build for the
  GPU and driver), with the library's own torch range as ``torchVersionRequirement``;
- SimpleITK and numpy are Slicer's own builds and are never replaced (pinned in a constraints file);
- the rest (nnunetv2, NePS, requests, filelock, ...) with ``slicer.util.pip_install`` after asking.

:func:`install_dependencies` is the whole flow; what it asks of Slicer goes through an
:class:`Installer` (the real one is :class:`SlicerInstaller`), so tests drive it with a fake.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence

from AutoNNUNetLib.errors import AutoNNUNetError

HERE = Path(__file__).resolve().parent
#: Where the library's metadata is found: the copy an extension build ships, then the checkout's.
PYPROJECT_CANDIDATES = (HERE / "pyproject.toml", HERE.parent.parent / "pyproject.toml")
LIBRARY_DISTRIBUTION = "AutoNNUNetLib"

TORCH = "torch"
PYTORCH_EXTENSION = "PyTorch"
#: Slicer's own builds: required by the library, never installed or replaced from here.
SLICER_PROVIDED = ("SimpleITK", "numpy")
#: What a remote search needs on this side (everything else runs on the runner).
REMOTE_ONLY = ("requests",)

VersionOf = Callable[[str], Optional[str]]


class InstallError(AutoNNUNetError):
    """A dependency could not be installed (the message says which and what to do)."""


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the pins -------------------------------------------------------------------------------------


def _pyproject_dependencies(path: Path) -> list[str]:
    import tomllib  # Python 3.11+ (Slicer 5.10 ships 3.12)

    with open(path, "rb") as handle:
        return [str(r) for r in tomllib.load(handle)["project"]["dependencies"]]


def library_requirements(candidates: Sequence[Path] = PYPROJECT_CANDIDATES) -> list[str]:
    """The library's runtime requirements (``[project] dependencies``: torch, nnunetv2, NePS, ...)."""
    for path in candidates:
        if path.is_file():
            return _pyproject_dependencies(path)
    try:
        requires = importlib.metadata.requires(LIBRARY_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    found = [r for r in requires if "extra ==" not in r]
    if not found:
        raise InstallError("the library's metadata (pyproject.toml) is missing from this installation; "
                           "reinstall the AutoNNUNet extension")
    return found


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise InstallError(f"cannot read the requirement {requirement!r}")
    return match.group(1)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_requirement(requirements: Iterable[str], name: str) -> str:
    for requirement in requirements:
        if _canonical(requirement_name(requirement)) == _canonical(name):
            return requirement.strip()
    raise InstallError(f"the library's metadata names no {name} requirement")


def torch_requirement(requirements: Optional[Sequence[str]] = None) -> str:
    """The library's torch requirement (name and version range, as pyproject.toml states it)."""
    return find_requirement(requirements if requirements is not None else library_requirements(), TORCH)


def torch_version_specifier(requirements: Optional[Sequence[str]] = None) -> str:
    """The version range only (no name): what ``installTorch(torchVersionRequirement=)`` takes."""
    requirement = torch_requirement(requirements)
    return requirement[len(requirement_name(requirement)):].strip()


def pip_requirements(requirements: Optional[Sequence[str]] = None) -> list[str]:
    """What pip installs inside Slicer: every requirement but torch and Slicer's own packages."""
    requirements = requirements if requirements is not None else library_requirements()
    skipped = {_canonical(n) for n in (TORCH, *SLICER_PROVIDED)}
    return [r.strip() for r in requirements if _canonical(requirement_name(r)) not in skipped]


def requirement_satisfied(requirement: str, version_of: VersionOf = installed_version) -> bool:
    """Installed, at a version the requirement allows (any version when ``packaging`` is missing)."""
    version = version_of(requirement_name(requirement))
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # Slicer ships packaging; without it, presence is all we can check
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def missing_requirements(requirements: Optional[Sequence[str]] = None, version_of: VersionOf = installed_version,
                         remote_only: bool = False) -> list[str]:
    """Requirements not installed, or at a version outside their range (torch first)."""
    requirements = list(requirements if requirements is not None else library_requirements())
    if remote_only:
        requirements = [find_requirement(requirements, name) for name in REMOTE_ONLY]
    else:
        requirements = [torch_requirement(requirements), *pip_requirements(requirements)]
    return [r for r in requirements if not requirement_satisfied(r, version_of)]


def constraints_text(version_of: VersionOf = installed_version) -> str:
    """pip constraints that keep torch (the PyTorchUtils build) and Slicer's own packages as they are."""
    pins = [f"{name}=={version}" for name in (TORCH, *SLICER_PROVIDED) if (version := version_of(name))]
    return "\n".join(pins) + "\n"


def versions_text(version_of: VersionOf = installed_version) -> str:
    """``torch 2.6.0, nnunetv2 2.8.1, neural-pipeline-search 0.17.0`` for the Setup section."""
    names = (TORCH, "nnunetv2", "neural-pipeline-search")
    return ", ".join(f"{name} {version_of(name) or 'missing'}" for name in names)


# -- the install ----------------------------------------------------------------------------------


@dataclass
class DependencyResult:
    installed: list[str] = field(default_factory=list)
    needs_restart: bool = False
    message: str = ""
    declined: bool = False  # the user said no: nothing failed, nothing was changed


class Installer(Protocol):
    """What the install asks of Slicer."""

    def pytorch_utils_available(self) -> bool: ...
    def extension_installed(self, name: str) -> bool: ...
    def install_extension(self, name: str) -> bool: ...
    def install_torch(self, version_specifier: str) -> bool: ...
    def pip_install(self, arguments: list[str]) -> None: ...
    def confirm(self, question: str) -> bool: ...
    def log(self, text: str) -> None: ...


def install_dependencies(installer: Installer, requirements: Optional[Sequence[str]] = None,
                         version_of: VersionOf = installed_version,
                         loaded_modules: Optional[Iterable[str]] = None) -> DependencyResult:
    """Install what is missing: the PyTorch extension, torch through it, the rest with pip.

    Asks once before installing the PyTorch extension and installs it without Slicer's own
    restart prompt (a decline is a result, not an error); the caller offers the restart.
    """
    requirements = list(requirements if requirements is not None else library_requirements())
    if not installer.pytorch_utils_available():
        if not installer.extension_installed(PYTORCH_EXTENSION):
            if not installer.confirm(
                    "AutoNNUNet installs PyTorch through the PyTorch extension, which is not installed.\n\n"
                    "Install the PyTorch extension now? Slicer must be restarted afterwards."):
                return DependencyResult(message="The PyTorch extension was not installed. Install it from the "
                                        "Extensions Manager (or click 'Check / install' again) when ready.",
                                        declined=True)
            installer.log("Installing the PyTorch extension...")
            if not installer.install_extension(PYTORCH_EXTENSION):
                raise InstallError("Could not install the PyTorch extension; install it from the Extensions Manager.")
        return DependencyResult([f"{PYTORCH_EXTENSION} extension"], True,
                                "The PyTorch extension is installed. Restart Slicer, then click 'Check / install' again.")

    installed: list[str] = []
    loaded = set(sys.modules if loaded_modules is None else loaded_modules)
    watched = (TORCH, *SLICER_PROVIDED, "requests", "packaging")
    before = {name: version_of(name) for name in watched}
    if not requirement_satisfied(torch_requirement(requirements), version_of):
        installer.log("Installing PyTorch (this can take several minutes)...")
        if not installer.install_torch(torch_version_specifier(requirements)):
            raise InstallError("PyTorch installation failed (see the Python console).")
        installed.append(TORCH)

    to_install = [r for r in pip_requirements(requirements) if not requirement_satisfied(r, version_of)]
    if to_install:
        installer.log("Installing " + ", ".join(to_install) + " ...")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write(constraints_text(version_of))
        try:
            installer.pip_install([*to_install, "--constraint", constraints.name])
        finally:
            os.unlink(constraints.name)
        installed += to_install
    importlib.invalidate_caches()
    still = missing_requirements(requirements, version_of)
    if still:
        raise InstallError("Still missing after installation: " + ", ".join(still))
    changed = [name for name in watched if version_of(name) != before[name] and name.split("-")[0] in loaded]
    if changed:
        return DependencyResult(installed, True, "Installed. Packages Slicer had already loaded changed ("
                                + ", ".join(changed) + "): restart Slicer before continuing.")
    return DependencyResult(installed, False, "Dependencies installed: " + versions_text(version_of))


def upgrade_dependencies(installer: Installer, requirements: Optional[Sequence[str]] = None,
                         version_of: VersionOf = installed_version,
                         loaded_modules: Optional[Iterable[str]] = None) -> DependencyResult:
    """pip packages to the newest versions their ranges allow (still within the library's pins);
    torch stays the PyTorch extension's build and Slicer's own packages stay pinned."""
    requirements = list(requirements if requirements is not None else library_requirements())
    loaded = set(sys.modules if loaded_modules is None else loaded_modules)
    names = [requirement_name(r) for r in pip_requirements(requirements)]
    before = {name: version_of(name) for name in names}
    installer.log("Upgrading " + ", ".join(names) + " ...")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(constraints_text(version_of))
    try:
        installer.pip_install([*pip_requirements(requirements), "--upgrade", "--constraint", constraints.name])
    finally:
        os.unlink(constraints.name)
    importlib.invalidate_caches()
    changed = [f"{name} {before[name] or 'missing'} -> {version_of(name)}" for name in names
               if version_of(name) != before[name]]
    if not changed:
        return DependencyResult([], False, "Everything is up to date: " + versions_text(version_of))
    restart = any(name.replace("-", "_").split("_")[0] in loaded for name in names if version_of(name) != before[name])
    return DependencyResult(changed, restart, "Upgraded " + ", ".join(changed)
                            + (": restart Slicer before continuing." if restart else "."))


class SlicerInstaller:
    """:class:`Installer` inside Slicer."""

    def __init__(self, log: Callable[[str], None] = print, confirmed: bool = False):
        self._log = log
        self._confirmed = confirmed  # the user already agreed to the whole install (the panel asks first)

    def pytorch_utils_available(self) -> bool:
        try:
            import PyTorchUtils  # noqa: F401  (provided by the PyTorch extension)
        except ImportError:
            return False
        return True

    def extension_installed(self, name: str) -> bool:
        import slicer

        return bool(slicer.app.extensionsManagerModel().isExtensionInstalled(name))

    def install_extension(self, name: str) -> bool:
        import slicer

        manager = slicer.app.extensionsManagerModel()
        interactive = manager.interactive
        manager.interactive = False  # the user was asked once already (install_dependencies)
        try:
            # Second argument restart=False: Slicer must not restart itself (and ask three times);
            # the module offers the restart once the install is done.
            return bool(manager.installExtensionFromServer(name, False))
        finally:
            manager.interactive = interactive

    def install_torch(self, version_specifier: str) -> bool:
        import PyTorchUtils

        logic = PyTorchUtils.PyTorchUtilsLogic()
        return logic.installTorch(askConfirmation=False, torchVersionRequirement=version_specifier) is not None

    def pip_install(self, arguments: list[str]) -> None:
        import slicer

        slicer.util.pip_install(arguments)

    def confirm(self, question: str) -> bool:
        if self._confirmed:
            return True
        import slicer

        return bool(slicer.util.confirmOkCancelDisplay(question, "AutoNNUNet dependencies"))

    def log(self, text: str) -> None:
        self._log(text)
