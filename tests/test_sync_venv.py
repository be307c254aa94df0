"""scripts/sync_venv.py: `make install` removes what requirements.lock dropped, so .venv stays CI's venv."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("sync_venv", REPO / "scripts" / "sync_venv.py")
sync = sys.modules["sync_venv"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(sync)

LOCK = ["# a lock as pip freeze writes it", "Foo_Bar==1.0", "torch==2.13.0", "setuptools==84.2.1", ""]


def _env(*dists: tuple) -> dict:
    return {sync.canonical(d[0]): sync.Installed(*d) for d in dists}


def test_a_package_the_lock_dropped_is_stale_and_so_is_what_only_it_needed():
    installed = _env(("foo.bar", "1.0"), ("torch", "2.13.0+cpu", ("setuptools", "typing-extensions>=4")),
                     ("typing_extensions", "4.15.0"), ("setuptools", "84.2.1"), ("pip", "23.2.1"),
                     ("kocr", "0.1.0", ("torch",)), ("Old_Pkg", "2.0", ("old-dep",)), ("old-dep", "1.0"))
    lock = sync.read_lock(LOCK)
    assert sync.stale(lock, installed, keep=("kocr",)) == ["old-dep", "Old_Pkg"]
    assert sync.off_lock(lock, installed) == []  # foo.bar is Foo_Bar; 2.13.0+cpu satisfies ==2.13.0
    assert sync.stale(lock, installed) == ["kocr", "old-dep", "Old_Pkg"]  # the project is kept only when named


def test_torch_dependencies_the_lock_does_not_pin_are_kept_when_their_marker_holds_here():
    # PyPI's CUDA torch brings nvidia-* wheels on Linux: not in the CPU lock, still not stale
    here = f'platform_system == "{__import__("platform").system()}"'
    installed = _env(("torch", "2.13.0", (f"nvidia-cublas==13.1.1.3; {here}", "never-here; python_version < '3'",
                                           'docs-only; extra == "docs"')),
                     ("nvidia-cublas", "13.1.1.3"), ("never-here", "1"), ("docs-only", "1"),
                     ("foo-bar", "1.0"), ("setuptools", "84.2.1"))
    assert sync.stale(sync.read_lock(LOCK), installed) == ["docs-only", "never-here"]
    lock = sync.read_lock(["torch[docs]==2.13.0"])  # an extra the lock asks for keeps what it brings
    assert "docs-only" not in sync.stale(lock, installed)


def test_a_locked_package_missing_or_at_another_version_is_named():
    installed = _env(("foo-bar", "1.1"), ("torch", "2.13.0+cu130"))
    assert sync.off_lock(sync.read_lock(LOCK), installed) == [
        "Foo_Bar==1.0: 1.1 installed", "setuptools==84.2.1: not installed"]


def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A distribution as pip installs one: a module and a dist-info whose RECORD lists both."""
    module = site / f"{name.replace('-', '_')}.py"
    module.write_text("")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (info / "INSTALLER").write_text("pip\n")
    records = [module.name, f"{info.name}/METADATA", f"{info.name}/INSTALLER", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in records))
    return module


def test_it_uninstalls_from_a_real_venv_only_what_the_lock_dropped(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    tools = tmp_path / "tools"  # pip and packaging on its path, outside its site-packages (ensurepip: 20 s)
    tools.mkdir()
    for package in ("pip", "packaging"):
        (tools / package).symlink_to(Path(sysconfig.get_path("purelib")) / package)
    (site / "tools.pth").write_text(f"{tools}\n")
    kept = _fake_dist(site, "kept-pkg", "1.0", ("kept-dep",))
    kept_dep = _fake_dist(site, "kept-dep", "3.0")
    project = _fake_dist(site, "demo", "0.1.0")
    dropped = _fake_dist(site, "dropped-pkg", "2.0")
    (tmp_path / "requirements.lock").write_text("kept-pkg==1.0\nkept-dep==3.0\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0.1.0"\n')
    script = [str(python), str(REPO / "scripts" / "sync_venv.py"), str(tmp_path / "requirements.lock")]

    warned = subprocess.run([*script, "--warn-only"], capture_output=True, text=True)
    assert warned.returncode == 0 and "1 installed but not in" in warned.stderr and "dropped-pkg" in warned.stderr
    assert dropped.exists()
    synced = subprocess.run(script, capture_output=True, text=True)
    assert synced.returncode == 0, synced.stderr
    assert "uninstalling 1 not in" in synced.stderr and "dropped-pkg" in synced.stderr
    assert not dropped.exists() and not list(site.glob("dropped_pkg-*.dist-info"))
    assert kept.exists() and kept_dep.exists() and project.exists()
    again = subprocess.run(script, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr == ""  # nothing left to do: silent


def test_the_makefile_syncs_after_every_install_step_and_its_stamp_follows_the_lock():
    rule = (REPO / "Makefile").read_text(encoding="utf-8").split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    head, *steps = rule.splitlines()
    assert "requirements.lock" in head.split()  # a pulled lock re-runs the rule, and so the sync
    assert "scripts/sync_venv.py requirements.lock" in steps[-2] and steps[-1].strip() == "touch $@"


def test_its_docstring_examples_hold():  # scripts/ is outside pytest's doctest paths
    import doctest

    assert doctest.testmod(sync).failed == 0
