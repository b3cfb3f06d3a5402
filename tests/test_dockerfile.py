"""The server image, checked without a Docker engine: lint the Dockerfile and repeat its steps.

No Docker engine runs on CI, so this test replays what the image does: the builder stage's
``pip install .`` into a fresh virtual environment, then the entrypoint (``affinity serve``) and the
health-check command, started from that environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed on this platform")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_is_slim_non_root_with_healthcheck() -> None:
    steps = _instructions()
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) == 2, "expected a builder stage and a final stage"
    final = steps[froms[-1] :]
    assert "slim" in final[0][1]
    users = [arg for op, arg in final if op == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert any(op == "HEALTHCHECK" for op, _ in final)
    entry = [arg for op, arg in final if op == "ENTRYPOINT"]
    assert entry == ['["affinity", "serve"]']
    # No compilers or build tools are installed in the final stage.
    runs = " ".join(arg for op, arg in final if op == "RUN")
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make)\b", runs)


@pytest.mark.slow
def test_image_install_and_entrypoint_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    # The builder stage: `pip install .` from a copy of the sources the Dockerfile COPYs.
    src = tmp_path / "src"
    src.mkdir()
    copied = [
        source
        for op, arg in _instructions()
        if op == "COPY" and "--from" not in arg
        for source in arg.split()[:-1]  # every source; the last word is the destination
    ]
    for name in copied:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    run_steps = " ".join(arg for op, arg in _instructions() if op == "RUN")
    assert "pip install --constraint requirements.lock ." in run_steps
    install = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--constraint",
            str(src / "requirements.lock"),
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    affinity = env_dir / "bin" / "affinity"
    # The entrypoint with a model that does not exist: a clean one-line failure, no traceback.
    run = subprocess.run(
        [str(affinity), "serve", "--model", str(tmp_path / "missing-model"), "--port", "0"],
        capture_output=True,
        text=True,
        env={**env, "AFFINITY_CACHE_DIR": str(tmp_path / "cache")},
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "missing-model" in run.stderr
    help_run = subprocess.run(
        [str(affinity), "serve", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert help_run.returncode == 0 and "--port" in help_run.stdout
    health = subprocess.run(
        [str(affinity), "health", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert health.returncode == 0 and "--target" in health.stdout
