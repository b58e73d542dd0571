"""The documentation: the site builds strictly, and the examples of the README and the guides run.

Every ```python, ```bash and ```console block of the README, the quickstart and the guides is
one of three kinds, told by the HTML comment on the line right before it:

- no comment: it runs, in order, in one scratch folder per page (so a page's later blocks see
  what its earlier blocks wrote). `microtune` is the real command line; `train` and `federate`
  run 2 steps on at most 64 training examples, and `../shared/data` is the benchmark data.
  Python blocks run in this process with `max_steps=2`.
- `<!-- not run: REASON -->`: not run here (a GPU, a network, a server that runs until stopped,
  minutes of training); every `microtune` command in it must still parse with the real parser,
  and a Python block must compile.
- `<!-- NAME-snippet -->`: run by the named test elsewhere (which finds it by that comment).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import microtune
import microtune.peft
from microtune.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted(REPO.glob("docs/guides/*.md"))
PAGES = [REPO / "README.md", REPO / "docs" / "quickstart.md", *GUIDES]
FENCE = re.compile(
    r"^(?:<!--\s*(?P<mark>.*?)\s*-->\n)?```(?P<lang>python|bash|console)\n(?P<code>.*?)^```",
    re.S | re.M,
)
SNIPPET = re.compile(r"[a-z0-9-]+-snippet")
QUICK = ["--max-steps", "2", "--max-train-examples", "64", "--no-progress"]

# The `microtune` the blocks run: the real entry point, with training cut to a few steps and the
# project's data folder where the docs say `../shared/data`.
SHIM = """#!{python}
import sys
from microtune.__main__ import entry

args = [{data!r} if a == "../shared/data" else a for a in sys.argv[1:]]
if args[:1] in (["train"], ["federate"]):
    for flag in ("--max-steps", "--epochs", "--max-train-examples"):
        while flag in args:
            del args[args.index(flag) : args.index(flag) + 2]
    args += {quick!r}
sys.argv[1:] = args
sys.exit(entry())
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    mark: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def commands(self) -> str:
        """The shell text: a console block's `$ ` lines, or the whole bash block."""
        if self.lang != "console":
            return self.code
        lines = [line[2:] for line in self.code.splitlines() if line.startswith("$ ")]
        return "\n".join(lines) + "\n"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m["lang"], m["code"], m["mark"])
        for m in FENCE.finditer(text)
    ]


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def logical_lines(shell: str) -> list[str]:
    """Lines joined across `\\` continuations and quotes that span lines."""
    lines, pending = [], ""
    for line in shell.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open
            continue
        lines.append(pending)
        pending = ""
    assert not pending, f"unclosed quote in {pending!r}"
    return lines


def microtune_commands(shell: str) -> list[list[str]]:
    """The argument lists of every `microtune ...` (or `-m microtune ...`) command in `shell`."""
    found = []
    for line in logical_lines(shell):
        for segment in re.split(r"\||&&|;", line):
            words = shlex.split(segment, comments=True)
            for cut in ("<", ">", "&"):
                words = words[: words.index(cut)] if cut in words else words
            if "microtune" in words:
                found.append(words[words.index("microtune") + 1 :])
    return found


def test_the_pages_have_blocks_of_every_kind():
    kinds = {"run" if b.mark is None else b.mark.split(":")[0] for b in ALL_BLOCKS}
    assert {"run", "not run"} <= kinds
    assert len(PAGES) >= 10, [p.name for p in PAGES]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.name)
def test_every_block_is_marked_or_parses(block, capsys):
    """A mark is known and gives its reason; every microtune command parses; Python compiles."""
    if block.mark is not None and not block.mark.startswith("not run:"):
        assert SNIPPET.fullmatch(block.mark), f"{block.name}: unknown mark {block.mark!r}"
        users = [p for p in (REPO / "tests").glob("test_*.py") if block.mark in p.read_text()]
        assert users, f"{block.name}: no test runs the {block.mark} block"
    if block.mark is not None and block.mark.startswith("not run:"):
        assert len(block.mark.removeprefix("not run:").strip()) > 5, f"{block.name}: no reason"
    if block.lang == "python":
        compile(block.code, block.name, "exec")
        return
    for args in microtune_commands(block.commands()):
        try:
            build_parser().parse_args(args)
        except SystemExit as stop:
            pytest.fail(f"{block.name}: `microtune {shlex.join(args)}`: {capsys.readouterr().err}")
            raise AssertionError from stop


def test_microtune_commands_are_found_in_shell_text():
    shell = (
        'echo "x" | microtune predict --artifact a < in.txt\n'
        "torchrun -m microtune train \\\n --task sst2  # a comment\n"
        'microtune generate --prompt "two\nlines"\n'
    )
    found = microtune_commands(shell)
    assert found == [
        ["predict", "--artifact", "a"],
        ["train", "--task", "sst2"],
        ["generate", "--prompt", "two\nlines"],
    ]


def shim_folder(tmp_path: Path, data_dir: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    shim = folder / "microtune"
    shim.write_text(SHIM.format(python=sys.executable, data=str(data_dir), quick=QUICK))
    shim.chmod(0o755)
    return folder


def run_shell(block: Block, work: Path, bin_dir: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.commands()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{block.name} failed:\n{block.code}\n{done.stderr[-3000:]}"


def run_python(block: Block, data_dir: Path) -> None:
    code = re.sub(r"max_steps=\d+", "max_steps=2", block.code)
    code = code.replace('"../shared/data"', repr(str(data_dir)))
    exec(compile(code, block.name, "exec"), {"__name__": "__docs__"})


RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if b.mark is None}, key=str)


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_runnable_blocks_of_a_page_run(page, tmp_path, data_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = shim_folder(tmp_path, data_dir)
    monkeypatch.chdir(work)
    for block in blocks(page):
        if block.mark is None and block.lang == "python":
            run_python(block, data_dir)
        elif block.mark is None:
            run_shell(block, work, bin_dir)


def test_the_site_builds_strictly_with_every_command_and_public_name(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src"), NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    for command in ("train", "eval", "predict", "export", "serve", "federate", "push", "plot"):
        assert f"usage: microtune {command}" in cli_page
    assert "--dp-epsilon" in cli_page and "--max-copy-mb" in cli_page
    api_page = (site / "reference" / "api" / "index.html").read_text()
    for name in set(microtune.__all__) - {"__version__"}:
        assert re.search(rf'id="microtune\.[\w.]*\.{name}"', api_page), name


def test_the_api_page_documents_every_public_name():
    page = (REPO / "docs" / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: microtune(?:\.\w+)*\.(\w+)$", page, re.M))
    public = set(microtune.__all__) | set(microtune.peft.__all__)
    assert documented == public - {"__version__", "SUPPORTED_PEFT"}


def test_the_readme_fits_on_two_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 100
