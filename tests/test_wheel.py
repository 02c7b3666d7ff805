"""`pip install .` (not editable) works outside the repository: the wheel carries the policies.

The wheel is built from this checkout and installed into a new virtual environment in a
temporary folder; that environment borrows the project environment's dependencies (torch,
transformers, ...) through a path entry, which makes no copy of lifelong importable from the
checkout. Then, from that folder, `lifelong init --help` runs and a shipped policy is found
by name inside the installed package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd, env=None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installed_outside_the_repository_finds_its_policies(tmp_path):
    src = tmp_path / "src"          # a copy: building in the checkout would leave build/ there
    shutil.copytree(ROOT / "lifelong", src / "lifelong", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", wheels, src, cwd=tmp_path)
    (wheel,) = wheels.glob("lifelong-*.whl")

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    # the dependencies, not lifelong: a plain path entry processes no .pth file there, so the
    # project environment's editable finder for the checkout is never installed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIFELONG_POLICIES")}
    assert "--policy" in run(env_dir / "bin" / "lifelong", "init", "--help", cwd=work, env=env)
    where = run(py, "-c", "import lifelong; from lifelong.policy import find_policy, load_policy; "
                "p = find_policy('smollm2-135m'); load_policy(p); print(lifelong.__file__); print(p)",
                cwd=work, env=env).split()
    assert all(Path(w).is_relative_to(site) for w in where), where
