"""Every bad input of tests/error_cases.py gives its exact one-line error and exit status.

docs/errors.md is rendered from the same table; test_docs_match_table fails when the two
disagree. Regenerate the document with::

    python tests/test_errors.py --write-docs
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cyclical_training.cli import main
from cyclical_training.errors import ConfigError, DataError

from error_cases import (
    BAD_OPTION,
    CASES,
    GROUPS,
    INTERRUPT_BEFORE_TRAINING,
    INTERRUPT_KEPT,
    INTERRUPT_NO_CHECKPOINT,
    INTERRUPT_NO_OUT,
    LOCKED_CHECKPOINT,
    NONFINITE_WEIGHTS,
    RUN_FAILURE,
    ErrorCase,
    SharedRuns,
    ShellPayload,
    gct_command,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


# Running a case ----------------------------------------------------------------------------------


def normalize(text: str, tmp: Path) -> str:
    """Replace the case's folder by <tmp> and memory addresses by 0x<address>."""
    for folder in sorted({str(tmp.resolve()), str(tmp)}, key=len, reverse=True):
        text = text.replace(folder, "<tmp>")
    return re.sub(r"0x[0-9a-f]{6,}", "0x<address>", text)


def run_main(arguments: list[str]) -> int:
    try:
        return main(arguments)
    except SystemExit as exit_info:  # argparse errors exit from inside parse_args
        return exit_info.code


def run_case(case: ErrorCase, tmp: Path, shared: SharedRuns, capsys) -> tuple[int, str]:
    """Run ``case`` in ``tmp`` and return its exit status and normalized standard error."""
    if case.setup is not None:
        case.setup(tmp, shared)
    capsys.readouterr()
    arguments = [argument.replace("<tmp>", str(tmp)) for argument in case.arguments]
    status = run_main(arguments)
    return status, normalize(capsys.readouterr().err, tmp)


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> SharedRuns:
    def train(arguments: list[str]) -> None:
        status = run_main(arguments)
        assert status == 0, f"setup run gct {' '.join(arguments)} exited with {status}"

    return SharedRuns(tmp_path_factory.mktemp("shared-runs"), train)


@pytest.fixture
def case_folder(tmp_path, monkeypatch) -> Path:
    # Relative paths resolve in the case folder, and decoded images are cached there too.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_error_case(case, case_folder, shared_runs, capsys):
    status, err = run_case(case, case_folder, shared_runs, capsys)

    assert err == case.message + "\n"
    assert status == case.status
    if case.forbidden is not None:
        assert not (case_folder / case.forbidden).exists(), "the payload in the input ran"


# The table itself ------------------------------------------------------------------------------


def test_table_has_thirty_cases():
    names = [case.name for case in CASES]

    assert len(CASES) >= 30
    assert len(names) == len(set(names))
    assert {case.group for case in CASES} == set(GROUPS)


def test_table_messages_are_one_line():
    for case in CASES:
        assert "\n" not in case.message, case.name
        assert case.message.startswith(f"gct {case.arguments[0]}: error: "), case.name
        assert case.status in (BAD_OPTION, RUN_FAILURE), case.name


def test_docs_match_table():
    assert DOCS.read_text() == render_docs(), "docs/errors.md is stale: run python tests/test_errors.py --write-docs"


# Payloads and --debug --------------------------------------------------------------------------


def test_pickle_payload_runs_without_weights_only(tmp_path):
    # The checkpoint case is only meaningful if its payload would run under a plain torch.load.
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": ShellPayload(f"echo pwned > {tmp_path}/pwned")}, checkpoint)

    torch.load(checkpoint, weights_only=False)

    assert (tmp_path / "pwned").read_text() == "pwned\n"


def test_yaml_payload_runs_with_unsafe_loader(tmp_path):
    yaml.unsafe_load(f"epochs: !!python/object/apply:os.system ['echo pwned > {tmp_path}/pwned']\n")

    assert (tmp_path / "pwned").read_text() == "pwned\n"


def test_debug_reraises_in_process(case_folder, capsys):
    with pytest.raises(ConfigError, match=r"^--epochs must be an integer >= 1, got 0$"):
        main(["train", "--epochs", "0", "--debug"])
    with pytest.raises(DataError, match="data path not found"):
        main(["train", "--data", "missing.tar.gz", "--debug"])


def test_console_script_traceback_only_with_debug(tmp_path):
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    commands = {
        "plain": [*gct_command(), "train", "--epochs", "0"],
        "debug": [*gct_command(), "train", "--epochs", "0", "--debug"],
    }
    processes = {
        name: subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    results = {name: process.communicate(timeout=180) for name, process in processes.items()}

    plain_err = results["plain"][1]
    assert plain_err == "gct train: error: --epochs must be an integer >= 1, got 0\n"
    assert processes["plain"].returncode == 2
    debug_err = results["debug"][1]
    assert debug_err.startswith("Traceback (most recent call last):\n")
    assert debug_err.endswith("cyclical_training.errors.ConfigError: --epochs must be an integer >= 1, got 0\n")
    assert processes["debug"].returncode == 1


# docs/errors.md ------------------------------------------------------------------------------------

DOCS_HEADER = """\
# Errors

<!-- Generated by `python tests/test_errors.py --write-docs` from tests/error_cases.py;
tests/test_errors.py fails when this file is stale. -->

Every error of `gct` is one line on standard error, `gct COMMAND: error: MESSAGE`. The message
names the option or file, what is allowed, and the value given. The exit status shows what kind
of error it was:

| Exit | Meaning |
|---|---|
| 2 | A bad option or config file. No training step ran. |
| 1 | A failure at run time: data, a checkpoint, a file that cannot be written, or numbers that are no longer finite. |
| 130, 143 | Interrupted by SIGINT (Ctrl-C) or SIGTERM; see [Interrupts](#interrupts). |

`--debug` shows the traceback instead of the one line. An error that the program does not
expect, which is a bug, prints `unexpected TYPE: MESSAGE; run again with --debug to see the
traceback` and exits with 1.

Below, `<tmp>` stands for the folder in which the command ran, and `0x<address>` for a memory
address. Every row is a test case in tests/test_errors.py, which checks the exact message and
exit status.
"""

DOCS_INTERRUPTS = """\
## Interrupts

SIGINT (Ctrl-C) and SIGTERM during `gct train` abandon the current epoch and keep the
checkpoint of the last finished one. A signal that arrives while metrics.jsonl and
checkpoint.pt are written is held back until both are written, so after a signal the
checkpoint's epoch matches the last line of metrics.jsonl. The exit status is 128 plus the
signal number: 130 for SIGINT, 143 for SIGTERM. The line on standard error is one of:

| When | Message |
|---|---|
| After a finished epoch, with `--out` | {kept} |
| In the first epoch, with `--out` | {no_checkpoint} |
| Without `--out` | {no_out} |
| While loading data or building the model | {before} |

`gct train --resume OUT` continues from the checkpoint. On the CPU the resumed run writes the
same metrics as a run that was never interrupted (tests/test_faults.py checks both signals).

## Checkpoint files

`checkpoint.pt` is written to `.checkpoint.pt.tmp` in the same folder, flushed to disk and
renamed over the old file. A process killed while it saves, even with SIGKILL, leaves the
previous checkpoint readable and at most one `.checkpoint.pt.tmp`, which the next save
overwrites and which can be deleted. A second process that saves to the same file while the
first one writes it stops with:

{locked}

A checkpoint is loaded with `torch.load(..., weights_only=True)`: tensors, numbers, strings,
lists and dicts only, never code. Config files are read with `yaml.safe_load`, and tar archives
are read as a stream without extracting anything. The [Untrusted files](#untrusted-files) table
shows what each one rejects.

## Numbers that are no longer finite

The training loop stops at the first step whose loss or gradient norm is NaN or infinite,
before the optimizer step, so those values never reach the weights. The message gives the
epoch, the step, both values and every knob value, and suggests what to change (see
[Run time](#run-time)). The checkpoint of the last finished epoch stays as it was.

As a second line of defence, a checkpoint whose weights are NaN or infinite is never written,
with this message, and the previous checkpoint is kept:

{nonfinite}
"""


def code(text: str) -> str:
    """Format ``text`` as a Markdown code span that is safe inside a table cell."""
    text = text.replace("|", "\\|")
    fence = "`"
    while fence in text:
        fence += "`"
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def render_docs() -> str:
    lines = [DOCS_HEADER]
    for group in GROUPS:
        lines += [f"## {group}", "", "| Input | Command | Exit | Message |", "|---|---|---|---|"]
        for case in CASES:
            if case.group == group:
                lines.append(f"| {case.problem} | {code(case.command)} | {case.status} | {code(case.message)} |")
        lines.append("")

    if any(case.gap is not None for case in CASES):
        lines += [
            "## Known gaps",
            "",
            "These cases print the message in the tables above today; the fix is not in place yet.",
            "",
            "| Input | Exit after the fix | Message after the fix | Fix |",
            "|---|---|---|---|",
        ]
        for case in CASES:
            if case.gap is not None:
                lines.append(f"| {case.problem} | {case.gap.status} | {code(case.gap.message)} | {case.gap.fix} |")
        lines.append("")

    example_out = "<tmp>/run"
    lines.append(DOCS_INTERRUPTS.format(
        kept=code(INTERRUPT_KEPT.format(signal="SIGINT", epoch=4, epochs=30, out=example_out, saved=3)),
        no_checkpoint=code(INTERRUPT_NO_CHECKPOINT.format(signal="SIGTERM", epochs=30, out=example_out)),
        no_out=code(INTERRUPT_NO_OUT.format(signal="SIGINT", epoch=4, epochs=30)),
        before=code(INTERRUPT_BEFORE_TRAINING.format(signal="SIGTERM")),
        locked=code("gct train: error: " + LOCKED_CHECKPOINT.format(folder=example_out)),
        nonfinite=code("gct train: error: " + NONFINITE_WEIGHTS.format(folder=example_out, tensor="blocks.0.0.weight")),
    ))
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-docs"]:
        sys.exit("usage: python tests/test_errors.py --write-docs")
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text(render_docs())
    print(f"wrote {DOCS}")
