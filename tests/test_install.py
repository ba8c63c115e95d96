"""Installing the project beside a torch someone already has keeps it; `make setup` keeps this machine's pins.

Every resolve is pip's own, as a dry run against local files only (--no-index): no download, no install.
"""

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename

from tests.conftest import ROOT

# This machine's local wheel stores (pip's find-links and a file index): they hold torch and torchvision
# releases other than the installed ones.
WHEEL_STORES = [Path("/opt/wheels"), Path("/opt/pypi-more/files")]


def declared(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, dependencies) if r.name == name)


def pinned() -> dict[str, str]:
    """constraints.txt's pins: {name: version}."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: str(r.specifier).removeprefix("==") for r in pins}


def pip_dry_run(args: list[str], report: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`pip install --dry-run` in this venv, offline and without the machine's pip config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [*args, "--dry-run", "--no-index", "--no-build-isolation", "--report", str(report)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def planned(report: Path) -> set[str]:
    return {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}


def test_declared_torch_ranges_admit_older_releases_and_this_machines_pins():
    for name, older in {"torch": "2.5.1", "torchvision": "0.20.1"}.items():
        specifier = declared(name).specifier
        assert specifier.contains(older) and specifier.contains(pinned()[name]), (name, str(specifier))
        assert not any(spec.operator in ("==", "===", "~=") for spec in specifier), (name, str(specifier))


def other_release(name: str, requires: str | None = None) -> Path | None:
    """A wheel of `name` from the local stores at a version other than the installed one (for torchvision:
    one built for the torch version `requires`)."""
    for wheel in sorted(p for store in WHEEL_STORES if store.is_dir() for p in store.glob(f"{name}-*.whl")):
        release = parse_wheel_filename(wheel.name)[1]
        if release.public == version(name).split("+")[0]:
            continue
        with zipfile.ZipFile(wheel) as archive:
            metadata = archive.read(_metadata_file(archive)).decode()
        needs = [Requirement(line.split(":", 1)[1]) for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
        if requires is None or any(r.name == "torch" and r.specifier.contains(requires) for r in needs):
            return wheel
    return None


def _metadata_file(archive: zipfile.ZipFile) -> str:
    return next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))


def test_installing_the_project_beside_another_torch_keeps_it(tmp_path):
    """A cluster's own torch and torchvision (another release than this venv's), seen by pip as installed:
    `pip install -e .` plans to install the project alone."""
    torch_wheel = other_release("torch")
    if torch_wheel is None:
        pytest.skip(f"no torch wheel other than {version('torch')} in {WHEEL_STORES}")
    torch_release = str(parse_wheel_filename(torch_wheel.name)[1].public)
    vision_wheel = other_release("torchvision", requires=torch_release)
    if vision_wheel is None:
        pytest.skip(f"no torchvision wheel built for torch {torch_release} in {WHEEL_STORES}")
    site = tmp_path / "site"  # each release's real metadata, ahead of the venv's on sys.path: what pip sees
    for wheel in (torch_wheel, vision_wheel):
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(_metadata_file(archive), site)
    report = tmp_path / "report.json"
    done = pip_dry_run([sys.executable, "-m", "pip", "install", "-e", "."], report, pythonpath=site)
    assert done.returncode == 0, done.stderr[-2000:]
    assert planned(report) == {"ddpmlab"}


def test_make_setup_installs_the_project_without_replacing_the_pinned_torch(tmp_path):
    """The project's install line of `make setup`, run as a dry run: in this venv it installs nothing but the
    project; asked besides for another torch (a dependency that wanted one would), it refuses rather than
    replace the pinned one."""
    lines = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    install = next(line for line in lines if " pip install " in line and " -e " in line)
    command = ["bash", "-c", f'{install} "$@"', "make"]
    report = tmp_path / "report.json"
    done = pip_dry_run(command, report)
    assert done.returncode == 0, done.stderr[-2000:]
    assert planned(report) == {"ddpmlab"}
    assert {name: version(name) for name in pinned()} == pinned()  # the venv holds the pins
    stores = [arg for store in WHEEL_STORES if store.is_dir() for arg in ("--find-links", str(store))]
    done = pip_dry_run([*command, *stores, f"torch!={pinned()['torch']}"], report)
    assert done.returncode != 0 and "ResolutionImpossible" in done.stderr, done.stderr[-2000:]
