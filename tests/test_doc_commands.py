"""Every command and flag quoted in the README, docs/, benchmarks/README.md and the scripts'
docstrings parses with the current flags.

A command is a line of a code block (fenced with ``` or ~~~, or indented by four spaces or a tab),
or an inline code span, that runs `python` (any version or path) or `torchrun`, possibly after a
`$ ` prompt, environment assignments, `env`, `time`, `nohup`, `srun` or `cd DIR &&`, with its
backslash continuations. Method scripts and eval_linear.py are parsed with tyro into their `Args`,
benchmark scripts with their argparse parser, and `torchrun` with torch's own parser, whose
training script is then parsed in turn. The flags that `benchmarks/reproduce.py` and
`benchmarks/train.py` pass on to a method script through `--method-args` are parsed with that
script's `Args` too. An inline code span that starts with a flag (`--temperature`) must name a
flag of some script of this repository or of torchrun. Nothing runs here. A command whose flags
parse but whose values the script rejects at start-up, such as a queue size that the batch does
not divide, still passes, and tests/test_bad_inputs.py covers those checks.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
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

# A Python interpreter (python, python3, python3.11, .venv/bin/python) or torchrun, as a word.
PROGRAM = r"(?:\S*/)?(?:python(?:\d+(?:\.\d+)?)?|torchrun)"
COMMAND_LINE = re.compile(rf"(?:^|\s){PROGRAM}\s")
INLINE_COMMAND = re.compile(rf"(?:^|\s){PROGRAM}\s+\S")  # a program with at least one argument
INLINE_CODE = re.compile(r"`([^`]+)`")
# Flags of other projects that the docs quote when they compare settings; they must not be taken
# for flags of this repository.
FOREIGN_FLAGS = {
    "--resnet_depth", "--color_jitter_strength", "--fine_tune_after_block", "--zero_init_logits_layer",
    "--warmup_epochs",  # google-research/simclr's run.py
    "--moco-k", "--moco-m", "--moco-t",  # facebookresearch/moco's main_moco.py
    "--nce-t",  # Wu et al.'s lemniscate.pytorch
    "--simclr-args",  # the former name of reproduce.py's --method-args, in the records
    "--_child",  # benchmarks/train.py's internal launcher, read before its parser
    "--no-",  # prose about the --no- form of boolean flags
}


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
    fence = None  # the opening ``` or ~~~ of the fenced block we are in
    paragraph: list[tuple[int, str]] = []  # (line index, text) of the prose lines since the last break

    def flush_paragraph() -> None:
        if paragraph:
            joined = "\n".join(text for _, text in paragraph)
            for match in INLINE_CODE.finditer(joined):
                line = paragraph[joined.count("\n", 0, match.start())][0]
                span = match.group(1).replace("\n", " ").strip()
                if INLINE_COMMAND.search(span) or span.startswith("--"):
                    commands.append(Command(f"{name}:{line + 1}", span))
            paragraph.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if fence is None and stripped[:3] in ("```", "~~~"):
            flush_paragraph()
            fence = stripped[:3]
            index += 1
            continue
        if fence is not None and stripped.startswith(fence):
            fence = None
            index += 1
            continue
        in_code = fence is not None or line.startswith(("    ", "\t"))
        if not in_code:
            if stripped:
                paragraph.append((index, line))
            else:
                flush_paragraph()
            index += 1
            continue
        flush_paragraph()
        code = stripped[2:] if stripped.startswith("$ ") else stripped
        if COMMAND_LINE.search(" " + code + " "):
            start = index
            parts = [code]
            while parts[-1].endswith("\\") and index + 1 < len(lines):
                parts[-1] = parts[-1][:-1]
                index += 1
                parts.append(lines[index].strip())
            commands.append(Command(f"{name}:{start + 1}", " ".join(parts)))
        index += 1
    flush_paragraph()
    return commands


def all_commands() -> list[Command]:
    return [command for name, text in documentation_texts() for command in extract_commands(name, text)]


@functools.lru_cache(maxsize=None)
def benchmark_parser(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_under_test", REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parse_or_fail(parse, argv: list[str], parser_name: str) -> object:
    """Call `parse(argv)`; turn the SystemExit of a rejected command line into an AssertionError."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv)
    except SystemExit as error:
        raise AssertionError(f"{parser_name} rejects {shlex.join(argv)!r} (exit status {error.code}):\n{stderr.getvalue()}")


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


PYTHON_OPTIONS_WITH_VALUE = ("-W", "-X")
MODULE_SCRIPTS = {"simclr": "simclr.py", "moco": "moco.py", "dcl": "dcl.py", "infonce_cpc": "infonce_cpc.py",
                  "eval_linear": "eval_linear.py", "benchmarks.reproduce": "benchmarks/reproduce.py",
                  "benchmarks.train": "benchmarks/train.py", "benchmarks.augment": "benchmarks/augment.py",
                  "benchmarks.train_throughput": "benchmarks/train_throughput.py"}


def strip_prefixes(tokens: list[str]) -> list[str]:
    """Drop what runs before the program: assignments, env, time, nohup, exec and srun's options."""
    while tokens:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]) or tokens[0] in ("env", "time", "nohup", "exec"):
            tokens = tokens[1:]
        elif tokens[0] == "srun":
            tokens = tokens[1:]
            while tokens and tokens[0].startswith("-"):
                tokens = tokens[1:]
        else:
            return tokens
    return tokens


@functools.lru_cache(maxsize=None)
def known_flags() -> frozenset[str]:
    """Every long flag of the repository's scripts and of torchrun."""
    flags = set()
    for args_type in TYRO_SCRIPTS.values():
        for field in dataclasses.fields(args_type):
            flag = "--" + field.name.replace("_", "-")
            flags.add(flag)
            if field.type in (bool, "bool"):
                flags.add("--no-" + field.name.replace("_", "-"))
    parsers = [benchmark_parser(script) for script in BENCHMARK_SCRIPTS] + [torchrun_parser()]
    for parser in parsers:
        flags.update(option for option in parser._option_string_actions if option.startswith("--"))
    return frozenset(flags)


def check_flag_span(text: str) -> None:
    flag = re.split(r"[\s=]", text, maxsplit=1)[0].rstrip(",.")
    if flag in FOREIGN_FLAGS:
        return
    assert flag in known_flags(), f"the docs quote {flag}, which no script of this repository accepts"


def check_command(text: str) -> None:
    """Parse one documented command line; raise AssertionError naming what no longer parses."""
    if text.startswith("--"):
        check_flag_span(text)
        return
    tokens = shlex.split(text, comments=True)
    segments, current = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    checked = 0
    for segment in segments:
        segment = strip_prefixes(segment)
        if segment and re.fullmatch(PROGRAM, segment[0]):
            check_program(segment[0], segment[1:])
            checked += 1
    assert checked, f"no python or torchrun command found in {text!r}"


def check_program(program: str, rest: list[str]) -> None:
    if Path(program).name.startswith("python"):
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[2:] if rest[0] in PYTHON_OPTIONS_WITH_VALUE else rest[1:]
        if not rest:
            return  # an interactive interpreter
        if rest[0] == "-c":
            return  # inline Python
        if rest[0] == "-m":
            module, rest = rest[1], rest[2:]
            if module == "torch.distributed.run":
                program = "torchrun"
            elif module in MODULE_SCRIPTS:
                check_script(MODULE_SCRIPTS[module], rest)
                return
            elif module in ("pip", "pytest", "venv", "zipfile", "tensorboard"):
                return
            else:
                raise AssertionError(f"the command runs module {module}, which is neither a script of this "
                                     f"repository nor a known tool")
        else:
            check_script(rest[0], rest[1:])
            return
    namespace = parse_or_fail(torchrun_parser().parse_args, rest, "torchrun")
    check_script(namespace.training_script, namespace.training_script_args)


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
    ("python3.11 simclr.py --no-such-flag 1", "simclr.py rejects"),
    (".venv/bin/python -u simclr.py --no-such-flag 1", "simclr.py rejects"),
    ("time nohup env OMP_NUM_THREADS=1 python dcl.py --no-such-flag 1", "dcl.py rejects"),
    ("cd repo && python moco.py --no-such-flag 1", "moco.py rejects"),
    ("srun --ntasks=2 python simclr.py --no-such-flag 1", "simclr.py rejects"),
    ("python -m simclr --no-such-flag 1", "simclr.py rejects"),
    ("python -m no_such_module", "neither a script of this repository"),
    ("--knn-neighbours 200", "no script of this repository accepts"),
])
def test_check_rejects_stale_command(text: str, expected: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(expected)):
        check_command(text)


@pytest.mark.parametrize("text", [
    "python -u simclr.py --epochs 2",
    "python -m pytest -q tests",
    "python -m venv .venv && . .venv/bin/activate",
    "--knn-k 200",
    "--no-sync-bn",
    "--rdzv-endpoint=127.0.0.1:29500",
])
def test_check_accepts_current_command(text: str) -> None:
    check_command(text)


def test_extract_finds_blocks_and_inline_code() -> None:
    page = "\n".join([
        "Run `python simclr.py --epochs 2` first, then `python dcl.py",  # 1: a span over two lines
        "--weighted` and `--temperature`.",
        "",
        "    python moco.py --queue-size 4096 \\",  # 4
        "        --temperature 0.2   # a comment",
        "",
        "```bash",  # 7
        "$ torchrun --nproc_per_node=2 dcl.py",
        "```",
        "~~~",
        "OMP_NUM_THREADS=1 python3.11 infonce_cpc.py",  # 11
        "~~~",
        "\tpython eval_linear.py --checkpoint RUN/checkpoint.pt",  # 13
        "python prose.py is not in a code block, and `torchrun` alone is no command",
    ])
    commands = extract_commands("page.md", page)
    assert [(command.source, command.text) for command in commands] == [
        ("page.md:1", "python simclr.py --epochs 2"),
        ("page.md:1", "python dcl.py --weighted"),
        ("page.md:2", "--temperature"),
        ("page.md:4", "python moco.py --queue-size 4096  --temperature 0.2   # a comment"),
        ("page.md:8", "torchrun --nproc_per_node=2 dcl.py"),
        ("page.md:11", "OMP_NUM_THREADS=1 python3.11 infonce_cpc.py"),
        ("page.md:13", "python eval_linear.py --checkpoint RUN/checkpoint.pt"),
    ]


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


def measured_figures(text: str) -> list[list[str]]:
    """The measured figures of every row of the page's results tables: each top-1 figure outside
    the published column, and the pretraining time in minutes."""
    rows = []
    for table in results_tables(text):
        for row in table:
            figures = []
            for column, cell in row.items():
                if "top-1" in column and "published" not in column:
                    figures += re.findall(r"\b0\.\d+\b", cell)
                elif column.startswith("pretraining"):
                    figures += re.findall(r"\b\d+(?:\.\d+)? min\b", cell)
            if figures:
                rows.append(figures)
    return rows


def test_results_figures_are_recorded() -> None:
    record_lines = (REPO_ROOT / "benchmarks" / "README.md").read_text().splitlines()
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for figures in measured_figures(page.read_text()):
            matches = [line for line in record_lines if all(re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", line)
                                                            for figure in figures)]
            assert matches, (f"{page.name}: no line of benchmarks/README.md records the figures {figures} "
                             f"of one results row together")
            checked += 1
    assert checked >= 12, f"only {checked} rows found in the results tables; has their format changed?"


def test_measured_figures_skip_published_column() -> None:
    page = "\n".join([
        "## Results", "",
        "| run | kNN top-1 | linear top-1 | pretraining | published |",
        "|---|---|---|---|---|",
        "| a | 0.3405 | no GPU figure yet | 41 min | kNN 0.826 |",
        "| b | 0.1 | 0.374 | 16.9 min, beside other work | - |",
        "| c | - | - | - | 0.91 |", "",
        "## Next section", "",
        "| run | kNN top-1 |", "|---|---|", "| d | 0.999 |",
    ])
    assert measured_figures(page) == [["0.3405", "41 min"], ["0.1", "0.374", "16.9 min"]]


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
