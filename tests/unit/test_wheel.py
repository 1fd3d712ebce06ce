"""recstream installs as a package: the wheel carries every file the code loads at run time.

The test builds the wheel from a copy of the source (offline: no build isolation, no index),
installs it into a fresh virtual environment outside the checkout and runs the installed
`recstream` from a temporary folder. The new environment sees this one's site-packages as a plain
path entry for the dependencies (torch is not installed twice); its ``.pth`` files, among them the
editable install that points back at the checkout, are not processed, and the test checks that
every project module comes from the new environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.unit.test_architecture import ORDER

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The bin folder of a fresh environment with the wheel installed, and its environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ORDER:
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # A path, never a bare name ("src" is also a project on PyPI), and no index: offline.
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", "./src"]
    built = _run([*pip, *build], tmp, env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("recstream-*.whl")

    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], tmp, env).stdout.strip())
    (site / "zz_recstream_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    done = _run(install, tmp, env)
    assert done.returncode == 0, done.stderr
    return target / "bin", env


def test_the_installed_command_answers_version_and_help(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bindir, env = installed
    version = _run([str(bindir / "recstream"), "--version"], tmp_path, env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "recstream, version 0.1.0"
    helped = _run([str(bindir / "recstream"), "--help"], tmp_path, env)
    assert helped.returncode == 0, helped.stderr
    for command in ("data", "doctor", "demo", "stack", "serve", "train"):
        assert f"  {command}" in helped.stdout


def test_the_package_data_is_installed_and_loads_from_the_environment(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bindir, env = installed
    probe = """
import importlib, json
from importlib import resources
from pathlib import Path
from cli.stack import LOG4J_CONFIG, POM
from consumers.cache_writer import RecsCache
from ops.rebuild import SWITCH_LUA
from streams.fold import LUA_SOURCE
packages = ["recstream", "schemas", "streams", "inference", "consumers", "api", "lab", "ops", "cli"]
print(json.dumps({
    "files": {p: importlib.import_module(p).__file__ for p in packages},
    "lua": [len(LUA_SOURCE), len(SWITCH_LUA),
            len(resources.files("consumers").joinpath("cache_cas.lua").read_text())],
    "kafka": [POM.is_file(), LOG4J_CONFIG.is_file(), str(POM)],
    "schemas": sorted(p.name for p in resources.files("schemas").joinpath("json").iterdir()),
}))
"""
    done = _run([str(bindir / "python"), "-c", probe], tmp_path, env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    venv_root = str(bindir.parent)
    assert all(path.startswith(venv_root) for path in found["files"].values()), found["files"]
    assert all(n > 0 for n in found["lua"])
    assert found["kafka"][:2] == [True, True]
    assert found["kafka"][2].startswith(venv_root)
    expected = sorted(p.name for p in (ROOT / "schemas" / "json").glob("*.json"))
    assert found["schemas"] == expected


def test_the_installed_doctor_and_data_commands_run_outside_the_checkout(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from cli.supervise import free_port
    from recstream.settings import CommonSettings

    bindir, env = installed
    env = {
        **env,
        "RECSTREAM_DATA_DIR": str(CommonSettings().data_dir),
        "RECSTREAM_STACK_DIR": str(tmp_path / "stack"),
        "RECSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "RECSTREAM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    listed = _run([str(bindir / "recstream"), "data", "list"], tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    assert "ml-100k" in listed.stdout
    assert "verified" in listed.stdout
    doctor = _run([str(bindir / "recstream"), "doctor", "--json"], tmp_path, env)
    assert doctor.returncode in (0, 1), doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["data"]["status"] == "ok"
    assert checks["kafka"]["status"] in ("ok", "fail")  # jars or Maven: the machine decides
