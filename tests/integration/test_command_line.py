"""One ``tdsteer`` program: subcommands come from the installed distributions through entry points."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

import tdsteer
import tdsteer.cli
import tdsteer_eval
from tdsteer._lazy import type_checking_imports
from tdsteer.cli import CLIError, command, main, program
from tdsteer.cli.info import COMMAND as INFO
from tdsteer_eval.cli import main as eval_main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_help_lists_the_commands_of_every_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    for name, distribution in command.PROVIDED_BY.items():
        assert name in out and f"[{distribution}]" in out, name
    assert "info" in out and "More commands come with" not in out


def test_version_names_all_four(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "--version")
    assert status == 0
    for distribution in command.DISTRIBUTIONS:
        assert f"{distribution} {metadata.version(distribution)}" in out


def test_each_distribution_registers_its_own_commands() -> None:
    entries = metadata.entry_points(group=command.GROUP)
    registered = {entry.name: entry.dist.name for entry in entries if entry.dist is not None}
    assert registered == command.PROVIDED_BY
    sources = {entry.name for entry in metadata.entry_points(group="tdsteer.model_sources")}
    assert sources == {"hf", "timm"}


def test_the_listing_matches_each_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The help lines listed without importing a command are the commands' own; an unlisted one loads."""
    commands = program.installed_commands()
    assert all(c.entry_point is not None for c in commands.values())
    for name, listed in commands.items():
        full = listed.resolve()
        assert full.entry_point is None and full.name == name, name
        assert full.help == command.SUMMARIES[name], f"update command.SUMMARIES[{name!r}] to the command's help"
        assert full.distribution == listed.distribution
    # A command of another distribution (not in SUMMARIES) is loaded for its help line.
    monkeypatch.setattr(program, "SUMMARIES", {"info": command.SUMMARIES["info"]})
    loaded = program.installed_commands()
    assert loaded["extract"].entry_point is None and loaded["extract"].help == command.SUMMARIES["extract"]
    status, out, _ = _run(capsys, "--help")
    assert status == 0 and "[tdsteer-hf]" in out


def test_a_broken_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    broken = command.Command.listed("extract", "broken", "tdsteer_nowhere.cli:COMMAND", "tdsteer-hf")
    with pytest.raises(SystemExit):
        program.dispatch(["--help"], {"extract": broken})
    assert "broken" in capsys.readouterr().out
    with pytest.raises(CLIError, match=r"cannot load the 'extract' command \(tdsteer_nowhere.cli:COMMAND\)"):
        program.dispatch(["extract", "--help"], {"extract": broken})


def _modules_after(*argv: str, entry: str = "tdsteer.cli") -> set[str]:
    """The heavy modules imported by a fresh interpreter that runs ``tdsteer ARGV`` in-process."""
    code = (
        "import sys\n"
        f"from {entry} import main\n"
        f"status = main({list(argv)!r})\n"
        "heavy = ('torch', 'tensordict', 'transformers', 'lm_eval', 'timm')\n"
        "print('imported:', *(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return set(done.stderr.splitlines()[-1].split()[1:])


def test_help_and_version_import_no_command() -> None:
    assert _modules_after("--help") == set()
    assert _modules_after("--version") == set()


def test_the_eval_alias_starts_without_lm_eval_models() -> None:
    """``tdsteer-eval --help`` loads lm-eval's registry only: the ``tdsteer`` model is registered by name."""
    assert _modules_after("--help", entry="tdsteer_eval.cli") <= {"lm_eval"}
    code = "import sys, tdsteer_eval; print(sorted(m for m in ('torch', 'lm_eval.api.model') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"


def test_a_commands_help_imports_only_that_command() -> None:
    assert not {"transformers", "lm_eval", "timm"} & _modules_after("info", "--help")
    assert not {"lm_eval", "timm"} & _modules_after("extract", "--help")


@pytest.mark.parametrize(
    "package", [tdsteer, tdsteer.cli, tdsteer_eval], ids=["tdsteer", "tdsteer.cli", "tdsteer_eval"]
)
def test_lazy_roots_export_what_they_type(package: ModuleType) -> None:
    """Each public name resolves on first use, from the imports the package shows to type checkers."""
    where = type_checking_imports(package.__name__, str(package.__file__))
    assert set(where) == set(package.__all__) - {"__version__"}
    # every submodule imported first: importing one binds its name on the package, which must not
    # shadow a public name that is something else (a function named like its module)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name, (module, attribute) in where.items():
        want = (
            importlib.import_module(module)
            if attribute is None
            else getattr(importlib.import_module(module), attribute)
        )
        assert getattr(package, name) is want, name
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def test_core_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no adapter installed, info --vector works and the adapters' commands say what to install."""
    monkeypatch.setattr(program, "installed_commands", lambda: {INFO.name: INFO})
    monkeypatch.setattr("tdsteer.cli.sources.installed_sources", lambda: [])
    path = tdsteer.SteeringVector({"blocks.1": torch.ones(4)}, metadata={"method": "mean_diff"}).save(tmp_path / "v.st")
    status, out, err = _run(capsys, "info", "--vector", str(path))
    assert status == 0, err
    assert "blocks.1: shape (4,) float32, norm 2" in out and "method: mean_diff" in out
    for name, distribution in command.PROVIDED_BY.items():
        status, _, err = _run(capsys, name, "--help")
        assert status == 2
        assert err.strip() == (
            f"tdsteer: error: 'tdsteer {name}' comes with {distribution}, which is not installed: "
            f"pip install {distribution}"
        )
    status, _, err = _run(capsys, "info", "--model", "gpt2")
    assert status == 2 and "pip install tdsteer-hf" in err and "tdsteer-timm" in err
    status, out, _ = _run(capsys, "--help")
    assert "More commands come with tdsteer-eval, tdsteer-hf, tdsteer-timm" in out.replace("\n", " ")


def test_user_errors_are_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.safetensors")
    status, _, err = _run(capsys, "info", "--vector", missing)
    assert status == 2 and err.count("\n") == 1 and err.startswith("tdsteer: error: No steering-vector file")
    with pytest.raises(tdsteer.SteeringVectorFileError):
        main(["--debug", "info", "--vector", missing])


def test_tdsteer_eval_is_an_alias(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert eval_main(["demo-task", str(tmp_path)]) == 0
    assert "tdsteer_demo_mc" in capsys.readouterr().out


def test_python_dash_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tdsteer", "--version"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("tdsteer "), done.stderr


def test_a_process_group_left_open_is_left_when_the_command_ends(tmp_path: Path) -> None:
    """Libraries that a command runs under a launcher (accelerate, lm-eval) join a process group and
    leave it open; the program leaves it, so that no rank tears its threads down at interpreter exit."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        path = tdsteer.SteeringVector({"blocks.1": torch.ones(4)}).save(tmp_path / "v.safetensors")
        assert main(["info", "--vector", str(path)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_pt_output_name_is_refused_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = _run(capsys, "extract", "--model", "no-such-model", "--pairs", "none.jsonl", "-o", "v.pt")
    assert status == 2 and "name it 'v.safetensors'" in err and "no-such-model" not in err


def test_a_closed_stdout_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``tdsteer info ... | head -1``: the reader went away; exit 0, no error line."""

    def broken(*args: object, **kwargs: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(program, "dispatch", broken)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        status = main(["info", "--vector", "v.safetensors"])
    assert status == 0 and (tmp_path / "err").read_text() == ""


def test_a_name_one_source_cannot_open_gets_another_sources_close_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tdsteer info --model resnt18``: the hub source takes any id and fails; timm knows ``resnet18``."""
    from tdsteer_timm.cli.source import SOURCE as TIMM

    class Hub:
        name = "hf"

        def recognizes(self, name: str) -> int:
            return 1

        def open(self, name: str) -> object:
            raise CLIError(f"cannot load the model {name!r}.")

    monkeypatch.setattr("tdsteer.cli.sources.installed_sources", lambda: [Hub(), TIMM])
    status, _, err = _run(capsys, "info", "--model", "resnt18")
    assert status == 2 and "cannot load the model 'resnt18'; did you mean timm model 'resnet18'" in err
