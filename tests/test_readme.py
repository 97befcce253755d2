"""Every command line and Python block of README.md runs, so a README line cannot break unnoticed.

One test per line (its id is the line). Each runs in a fresh temporary directory holding the
inputs the README assumes (`out_hf`, `out_orbax`, `long.txt`, links to `configs/`, `tests/`,
`scripts/`), in this process, with the embedded model stood in for by a tiny random 2-layer Llama
with SmolLM2's tokenizer (the factory of conftest.py), so that a line costs seconds:

- `python -m jaxllama.<tool> ...`: its `main()` with the README's arguments; generation capped at
  2 new tokens (`--max-new-tokens 2` appended), training lines with `--validate` appended (config,
  shapes and the whole train step traced; `tests/test_first_hour.py` and `tests/training/` run
  the tiny config and recipe for real), a convert's `--output` removed first;
- `python scripts/<x>.py ...`: its `main()` up to the point where it starts the long work (loading
  the model, or spawning processes): the flags parse and pass the script's own checks;
- `pip install ...`: not run; the extras named exist in pyproject.toml, a pinned `--no-deps`
  package is installed at that version, and the set-up line installs no test extra;
- `python -m pytest -q -n 2 tests`: the line appears verbatim in .ci/run (which runs it);
- a ```python block: executed.
The real embedded model's answer ("Paris") is checked by tests/test_generate_cli.py.
"""

import importlib
import importlib.metadata
import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{lang}\n(.*?)```", README, re.DOTALL)]


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


LINES = _command_lines()
PYTHON = _blocks("python")


def _id(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 90 else text[:87] + "..."


class _Started(Exception):
    """Raised where a script would begin its long work."""


@pytest.fixture(scope="module")
def stand_in(make_tiny_hf):
    """The tiny HF checkpoint that stands in for the embedded model."""
    return make_tiny_hf("readme", tie=True, kv_heads=2, context=128, seed=11)


@pytest.fixture(scope="module")
def stand_in_orbax(stand_in, tmp_path_factory):
    from jaxllama.checkpoint import load_checkpoint, save_orbax

    ck = load_checkpoint(stand_in)
    out = tmp_path_factory.mktemp("readme-orbax") / "orbax"
    save_orbax(ck.config, ck.params, ck.tokenizer, out, ck.generation_config)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch, stand_in, stand_in_orbax):
    import jaxllama.checkpoint

    for name in ("configs", "tests", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(stand_in, tmp_path / "out_hf")
    shutil.copytree(stand_in_orbax, tmp_path / "out_orbax")
    (tmp_path / "long.txt").write_text("A long document about rivers and the sea. " * 20)
    monkeypatch.setattr(jaxllama.checkpoint, "default_checkpoint", lambda: stand_in)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _commands(line: str) -> list[list[str]]:
    """The commands of a line: shell words split at `&&`."""
    out, cur = [], []
    for word in shlex.split(line):
        if word == "&&":
            out.append(cur)
            cur = []
        else:
            cur.append(word)
    return out + [cur]


def _exit_code(fn, *args) -> int:
    try:
        return fn(*args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _extras() -> set[str]:
    """The optional-dependency names of pyproject.toml (its `name = [` lines in that table)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+) = \[", table, re.MULTILINE))


def _check_pip(argv: list[str], line: str) -> None:
    assert argv[:2] == ["pip", "install"], argv
    extras = _extras()
    words = argv[2:]
    for i, w in enumerate(words):
        if w == "-e":
            target = words[i + 1]
            m = re.fullmatch(r"\.(\[([\w,]+)\])?", target)
            assert m, f"{target}: expected . or .[extra]"
            for extra in (m.group(2) or "").split(","):
                assert not extra or extra in extras, f"{extra}: no such extra in pyproject.toml"
        elif "==" in w:
            name, version = w.split("==")
            assert "--no-deps" in words, line
            assert importlib.metadata.version(name) == version, w
    if "jaxllama.generate" in line:  # the main job's set-up: what generation needs, no more
        assert "[test]" not in line and "torch" not in line, line


def _run_tool(argv: list[str], capsys) -> None:
    tool = argv[2].removeprefix("jaxllama.")
    args = argv[3:]
    if tool == "generate":
        args += ["--max-new-tokens", "2"]
    elif tool == "train" and "--validate" not in args:
        args += ["--validate"]
    elif tool == "convert":
        shutil.rmtree(args[args.index("--output") + 1], ignore_errors=True)
    main = importlib.import_module(f"jaxllama.{tool}").main
    code = _exit_code(main, args)
    cap = capsys.readouterr()
    assert code == 0, f"exit {code}: {cap.err[-2000:]}"
    if tool == "generate":
        assert "prompt(s)," in cap.err  # the statistics line: it generated
    if tool == "convert":
        assert Path(args[args.index("--output") + 1]).is_dir()


def _run_script(argv: list[str], monkeypatch) -> None:
    path = ROOT / argv[1]
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hooks = [n for n in ("load_checkpoint", "spawn") if hasattr(mod, n)]
    assert hooks, f"{path.name}: no load_checkpoint or spawn to stop at"

    def started(*a, **k):
        raise _Started

    for name in hooks:
        monkeypatch.setattr(mod, name, started)
    with pytest.raises(_Started):
        _exit_code(mod.main, argv[2:])


@pytest.mark.parametrize("line", LINES, ids=[_id(x) for x in LINES])
def test_readme_command_line(line, workdir, capsys, monkeypatch):
    for argv in _commands(line):
        if argv[0] == "pip":
            _check_pip(argv, line)
        elif argv[:3] == ["python", "-m", "pytest"]:
            ci = (ROOT / ".ci" / "run").read_text().splitlines()
            assert line in ci, f"{line!r} is not the command .ci/run runs"
        elif argv[:2] == ["python", "-m"] and argv[2].startswith("jaxllama."):
            _run_tool(argv, capsys)
        elif argv[0] == "python" and argv[1].startswith("scripts/"):
            _run_script(argv, monkeypatch)
        else:
            pytest.fail(f"no rule to check {shlex.join(argv)!r}: add one to tests/test_readme.py")


@pytest.mark.parametrize("block", PYTHON, ids=[f"python block {i}" for i in range(len(PYTHON))])
def test_readme_python_block(block, workdir):
    for out in re.findall(r"save_pretrained\(\w+, \"([^\"]+)\"", block):  # it writes these
        shutil.rmtree(out, ignore_errors=True)
    code = compile(block, "README.md (python block)", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README's own code, run as written


def test_readme_has_the_lines_this_test_knows():
    assert len(LINES) >= 15 and PYTHON
    assert any("python -m pytest -q -n 2 tests" in x for x in LINES)
    assert any(x.startswith("pip install -e . ") for x in LINES)
