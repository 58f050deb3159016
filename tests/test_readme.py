"""The README's two commands stay true: CI runs exactly its test command."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_the_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    commands = readme_commands()
    assert len(commands) >= 2
    run_job, run_tests = commands[0], commands[1]
    assert "streamfn run" in run_job and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci.splitlines()


def test_the_main_job_file_exists():
    run_job = readme_commands()[0]
    path = run_job.split("streamfn run ", 1)[1].split()[0]
    assert (ROOT / path).is_file()
