"""Every command quoted in the README, docs/, benchmarks/README.md and the scripts' docstrings
parses with the current flags.

A command is a line of a code block (fenced, or indented by four spaces) or an inline code span
that starts with `python`, `python3` or `torchrun`, optionally after environment assignments or
`srun`, with its backslash continuations. Method scripts and eval_linear.py are parsed with tyro
into their `Args`, benchmark scripts with their argparse parser, and `torchrun` with torch's own
parser, whose training script is then parsed in turn. The flags that `benchmarks/reproduce.py` and
`benchmarks/train.py` pass on to a method script through `--method-args` are parsed with that
script's `Args` too. Nothing runs: the check is that the documentation cannot name a flag, a value
or a script that the code no longer accepts.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import tyro
from torch.distributed.run import get_args_parser as torchrun_parser

import dcl
import eval_linear
import infonce_cpc
import moco
import simclr

REPO_ROOT = Path(__file__).resolve().parent.parent

TYRO_SCRIPTS = {
    "simclr.py": simclr.Args,
    "moco.py": moco.Args,
    "dcl.py": dcl.Args,
    "infonce_cpc.py": infonce_cpc.Args,
    "eval_linear.py": eval_linear.Args,
}
METHOD_SCRIPTS = ("simclr.py", "moco.py", "dcl.py", "infonce_cpc.py")
BENCHMARK_SCRIPTS = ("benchmarks/reproduce.py", "benchmarks/train.py", "benchmarks/augment.py",
                     "benchmarks/train_throughput.py")

COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:srun\s+)?(?:python3?|torchrun)\s")
INLINE_COMMAND = re.compile(r"`((?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3?|torchrun)\s[^`]+)`")


@dataclass(frozen=True)
class Command:
    source: str  # file and line, for the test id and failure messages
    text: str


def documentation_texts() -> list[tuple[str, str]]:
    """(name, text) of every markdown page and of the docstring of every script."""
    texts = []
    pages = [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    for page in pages:
        texts.append((str(page.relative_to(REPO_ROOT)), page.read_text()))
    for script in [*TYRO_SCRIPTS, "common.py", *BENCHMARK_SCRIPTS]:
        docstring = ast.get_docstring(ast.parse((REPO_ROOT / script).read_text()), clean=False)
        if docstring:
            texts.append((script, docstring))
    return texts


def extract_commands(name: str, text: str) -> list[Command]:
    """Find the commands of one page: code-block lines with their continuations, and inline code."""
    commands = []
    lines = text.splitlines()
    in_fence = False
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            index += 1
            continue
        in_code = in_fence or line.startswith("    ")
        if in_code and COMMAND_START.match(line.strip()):
            start = index
            parts = [line.strip()]
            while parts[-1].endswith("\\") and index + 1 < len(lines):
                parts[-1] = parts[-1][:-1]
                index += 1
                parts.append(lines[index].strip())
            commands.append(Command(f"{name}:{start + 1}", " ".join(parts)))
        else:
            for match in INLINE_COMMAND.finditer(line):
                commands.append(Command(f"{name}:{index + 1}", match.group(1)))
        index += 1
    return commands


def all_commands() -> list[Command]:
    return [command for name, text in documentation_texts() for command in extract_commands(name, text)]


@functools.lru_cache(maxsize=None)
def benchmark_parser(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_under_test", REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parse_or_fail(parse, argv: list[str], what: str) -> object:
    """Call `parse(argv)`; turn the SystemExit of a rejected command line into an AssertionError."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv)
    except SystemExit as error:
        raise AssertionError(f"{what} rejects {shlex.join(argv)!r} (exit status {error.code}):\n{stderr.getvalue()}")


def check_method_args(scripts: list[str], method_args: str, base: list[str]) -> None:
    for script in scripts:
        argv = [*base, *shlex.split(method_args)]
        parse_or_fail(lambda a, s=script: tyro.cli(TYRO_SCRIPTS[s], args=a), argv, f"{script} (through --method-args)")


def check_script(script: str, argv: list[str]) -> None:
    """Parse `argv` with the parser of `script`, a path relative to the repository root."""
    script = str(Path(script))
    if script.startswith("./"):
        script = script[2:]
    if script == "METHOD.py":  # a placeholder for any method script
        for method in METHOD_SCRIPTS:
            check_script(method, argv)
        return
    if script not in TYRO_SCRIPTS and script not in BENCHMARK_SCRIPTS:
        raise AssertionError(f"the command names {script}, which is not a script of this repository")
    if "--help" in argv or "-h" in argv:
        return
    if script in TYRO_SCRIPTS:
        parse_or_fail(lambda a: tyro.cli(TYRO_SCRIPTS[script], args=a), argv, script)
        return
    args = parse_or_fail(benchmark_parser(script).parse_args, argv, script)
    if script == "benchmarks/reproduce.py":
        base = ["--dataset", "folder", "--data-dir", "SUBSET", "--arch", args.arch, "--batch-size", str(args.batch_size)]
        check_method_args([f"{args.method}.py"], args.method_args, base)
    elif script == "benchmarks/train.py":
        methods = [f"{method.strip()}.py" for method in args.methods.split(",") if method.strip()]
        check_method_args(methods, args.method_args, ["--arch", args.arch])


def check_command(text: str) -> None:
    """Parse one documented command line; raise AssertionError naming what no longer parses."""
    tokens = shlex.split(text, comments=True)
    # Only the first command of `a && b` or `a; b` that runs a script matters here.
    for separator in ("&&", ";", "|"):
        if separator in tokens:
            tokens = tokens[:tokens.index(separator)]
    while tokens and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]) or tokens[0] == "srun"):
        tokens = tokens[1:]
    program, rest = tokens[0], tokens[1:]
    if program in ("python", "python3"):
        if rest[:2] == ["-m", "torch.distributed.run"]:
            program, rest = "torchrun", rest[2:]
        elif rest and rest[0] in ("-m", "-c"):
            return  # pip, pytest, venv, zipfile or inline Python: not a script of this repository
        else:
            check_script(rest[0], rest[1:])
            return
    if program == "torchrun":
        namespace = parse_or_fail(torchrun_parser().parse_args, rest, "torchrun")
        check_script(namespace.training_script, namespace.training_script_args)
        return
    raise AssertionError(f"unexpected program {program!r}")


COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[command.source for command in COMMANDS])
def test_documented_command_parses(command: Command) -> None:
    try:
        check_command(command.text)
    except AssertionError as error:
        raise AssertionError(f"{command.source}: {command.text}\n{error}") from None


def test_every_page_quotes_commands() -> None:
    sources = {command.source.split(":")[0] for command in COMMANDS}
    pages = ["README.md", "benchmarks/README.md", *(f"docs/{page.name}" for page in (REPO_ROOT / "docs").glob("*.md"))]
    for page in pages:
        assert page in sources, f"no command found in {page}; has the code-block format changed?"


def test_readme_runs_every_script() -> None:
    readme = [command.text for command in COMMANDS if command.source.startswith("README.md:")]
    for script in [*TYRO_SCRIPTS, "benchmarks/reproduce.py"]:
        assert any(re.search(rf"(^|[\s/]){re.escape(script)}(\s|$)", text) for text in readme), f"README.md quotes no command of {script}"


def test_each_method_page_gives_three_launches() -> None:
    pages = {"simclr.py": "docs/simclr.md", "moco.py": "docs/moco.md", "dcl.py": "docs/dcl.md",
             "infonce_cpc.py": "docs/cpc.md"}
    for script, page in pages.items():
        texts = [command.text for command in COMMANDS if command.source.startswith(page + ":")]
        single = [text for text in texts if text.startswith("python " + script)]
        eight = [text for text in texts if "--nproc_per_node=8" in text and "--nnodes=2" not in text and script in text]
        nodes = [text for text in texts if "--nnodes=2" in text and script in text]
        assert single, f"{page} quotes no one-process command of {script}"
        assert eight, f"{page} quotes no eight-GPU torchrun command of {script}"
        assert nodes, f"{page} quotes no two-node torchrun command of {script}"


@pytest.mark.parametrize("text, expected", [
    ("python simclr.py --no-such-flag 1", "simclr.py rejects"),
    ("python simclr.py --temperature hot", "simclr.py rejects"),
    ("python eval_linear.py", "eval_linear.py rejects"),  # --checkpoint is required
    ("python no_such_script.py --epochs 1", "not a script of this repository"),
    ("torchrun --nproc_per_node=8 --no-such-torchrun-flag moco.py", "torchrun rejects"),
    ("torchrun --nproc_per_node=8 moco.py --queue-size many", "moco.py rejects"),
    ("python benchmarks/reproduce.py --cifar10-dir D --work-dir W --method moco --method-args=--no-such-flag",
     "moco.py (through --method-args) rejects"),
    ("python benchmarks/train.py --methods simclr,dcl --method-args=--weighted", "simclr.py (through --method-args) rejects"),
    ("python benchmarks/augment.py --no-such-flag", "benchmarks/augment.py rejects"),
])
def test_check_rejects_stale_command(text: str, expected: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(expected)):
        check_command(text)


def test_extract_finds_blocks_and_inline_code() -> None:
    page = "\n".join([
        "Run `python simclr.py --epochs 2` first.",
        "",
        "    python moco.py --queue-size 4096 \\",
        "        --temperature 0.2   # a comment",
        "",
        "```",
        "torchrun --nproc_per_node=2 dcl.py",
        "```",
        "python prose.py is not in a code block",
    ])
    commands = extract_commands("page.md", page)
    assert [command.source for command in commands] == ["page.md:1", "page.md:3", "page.md:7"]
    assert commands[0].text == "python simclr.py --epochs 2"
    assert commands[1].text == "python moco.py --queue-size 4096  --temperature 0.2   # a comment"
    assert commands[2].text == "torchrun --nproc_per_node=2 dcl.py"


def results_tables(text: str) -> list[list[dict[str, str]]]:
    """The tables of a page's `## Results` section, each as a list of rows keyed by the header."""
    match = re.search(r"^## Results\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    if not match:
        return []
    tables, rows, header = [], [], None
    for line in [*match.group(1).splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells)))
        elif header is not None:
            tables.append(rows)
            rows, header = [], None
    return tables


def measured_figures(text: str) -> list[tuple[str, str]]:
    """(column, figure) of every measured top-1 figure in the page's results tables."""
    figures = []
    for table in results_tables(text):
        for row in table:
            for column, cell in row.items():
                if "top-1" in column and "published" not in column:
                    figures.extend((column, figure) for figure in re.findall(r"\b0\.\d+\b", cell))
    return figures


def test_results_figures_are_recorded() -> None:
    records = (REPO_ROOT / "benchmarks" / "README.md").read_text()
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for column, figure in measured_figures(page.read_text()):
            assert figure in records, (f"{page.name}: {column} {figure} is not in benchmarks/README.md, "
                                       f"which records every measured figure with its command")
            checked += 1
    assert checked >= 12, f"only {checked} figures found in the results tables; has their format changed?"


def test_measured_figures_skip_published_column() -> None:
    page = "\n".join([
        "## Results", "",
        "| run | kNN top-1 | linear top-1 | published |",
        "|---|---|---|---|",
        "| a | 0.3405 | no GPU figure yet | kNN 0.826 |",
        "| b | 0.1 | 0.374 | - |", "",
        "## Next section", "",
        "| run | kNN top-1 |", "|---|---|", "| c | 0.999 |",
    ])
    assert measured_figures(page) == [("kNN top-1", "0.3405"), ("kNN top-1", "0.1"), ("linear top-1", "0.374")]


def test_relative_links_resolve() -> None:
    pages = [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(REPO_ROOT)} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
                assert anchor in slugs, f"{page.relative_to(REPO_ROOT)} links to #{anchor}, which is no heading of {linked.name}"
