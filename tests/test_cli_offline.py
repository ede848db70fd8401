"""The offline verbs, `check` and `assign`: what an operator reads, and the exit codes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mmh3
import pytest

from proxy.offline.cli import main
from tests.conftest import EXE, ROOT, config_dict, write_config

EXAMPLE = ROOT / "config" / "routing.yaml"
ASSIGN_LINE = re.compile(
    r"\A(?P<user>.+?)  bucket (?P<bucket>\d+)  unleash (?P<unleash>\d+)  "
    r"(?P<backend>legacy|next_gen)  "
    r"\(phase (?P<phase>\w+), (?P<percentage>[\d.]+) %, bucketing (?P<bucketing>\w+)\)\Z")
BAD_CONFIG = """\
backends:
  legacy: {url: "http://127.0.0.1:8001"}
  next_gen: {url: "http://127.0.0.1:8002"}
rollout:
  percentage: 150
  percentag: 3
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=30, cwd=cwd)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0), out, err


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The shipped example, copied so its state file (relative to it) is this test's own."""
    path = tmp_path / "routing.yaml"
    shutil.copyfile(EXAMPLE, path)
    return path


def phase_config(tmp_path: Path, phase: str, percentage: float) -> Path:
    return write_config(tmp_path, config_dict(
        "http://127.0.0.1:8001", "http://127.0.0.1:8002",
        rollout={"phase": phase, "percentage": percentage, "salt": "s1"}))


def formula(salt: str, user: str) -> int:
    return int(mmh3.hash(salt + ":" + user, signed=False)) % 10000


# check ---------------------------------------------------------------------------------------


def test_check_accepts_the_example_and_prints_the_effective_plan(example: Path) -> None:
    result = cli("check", "--config", str(example), cwd=example.parent)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"config {example} (version " in out
    assert "is valid" in out
    # The example's schedule dates are past: it starts at step two.
    assert re.search(r"^phase:\s+progressive \(YAML: shadow\)$", out, re.M)
    assert re.search(r"^percentage:\s+25 % \(YAML: 10\)\s+salt 'next-gen-2024'$", out, re.M)
    assert re.search(r"^backend:\s+legacy http://127\.0\.0\.1:8001 ", out, re.M)
    assert re.search(r"^backend:\s+next_gen http://127\.0\.0\.1:8002 ", out, re.M)
    assert re.search(r"^state:\s+file " + re.escape(str(example.parent / "state")), out, re.M)
    assert out.count("(applied)") == 2


def test_check_shows_the_config_version_of_the_file(example: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    code, out, _ = run_main(["check", "--config", str(example)], capsys)

    assert code == 0
    assert f"(version {hashlib.sha256(example.read_bytes()).hexdigest()[:12]})" in out


def test_check_plan_lists_fallback_status_codes_and_paths(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, config_dict(
        "http://127.0.0.1:8001", "http://127.0.0.1:8002",
        fallback={"on": ["timeout", 429]}, routing={"paths": ["/v1/", "/v2/"]},
        shadow={"sample": 0}, rollout={"phase": "shadow"}))

    code, out, _ = run_main(["check", "--config", str(path)], capsys)

    assert code == 0
    assert re.search(r"^fallback:\s+on timeout, 429,", out, re.M)
    assert re.search(r"^paths:\s+/v1/, /v2/ \(others go to legacy\)$", out, re.M)
    assert re.search(r"^mirroring:\s+nothing \(shadow\.sample is 0\)", out, re.M)


def test_check_refuses_a_bad_config_with_exit_1_and_key_paths_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(BAD_CONFIG)

    result = cli("check", "--config", str(path), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: 2 problem(s), the config is refused:"
    assert "  rollout.percentage: must be between 0 and 100, got 150 (line 5)" in lines
    assert "  rollout.percentag: unknown key (did you mean 'percentage'?) (line 6)" in lines


def test_check_refuses_a_missing_file_with_exit_1(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["check", "--config", str(tmp_path / "absent.yaml")], capsys)

    assert code == 1
    assert out == ""
    assert "cannot read" in err


# assign --------------------------------------------------------------------------------------


def test_assign_prints_user_bucket_and_backend_per_line_by_the_formula(example: Path) -> None:
    users = ["alice", "bob", "ivan", "mallory", "trent", "walter", "user with spaces"]

    result = cli("assign", "--config", str(example), *users, cwd=example.parent)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(users)
    seen_backends = set()
    for user, line in zip(users, lines, strict=True):
        match = ASSIGN_LINE.match(line)
        assert match, line
        expected = formula("next-gen-2024", user)
        assert match["user"] == user
        assert int(match["bucket"]) == expected
        # The example runs progressive at 25 % once its schedule applies.
        assert match["backend"] == ("next_gen" if expected < 2500 else "legacy")
        assert (match["phase"], match["percentage"]) == ("progressive", "25")
        seen_backends.add(match["backend"])
    assert seen_backends == {"legacy", "next_gen"}


@pytest.mark.parametrize(("phase", "backend"), [("legacy", "legacy"), ("shadow", "legacy"),
                                                ("opt_in", "legacy"), ("default", "next_gen"),
                                                ("sunset", "next_gen")])
def test_assign_follows_the_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  phase: str, backend: str) -> None:
    path = phase_config(tmp_path, phase, 100)

    code, out, _ = run_main(["assign", "--config", str(path), "u1", "u2", "u3"], capsys)

    assert code == 0
    for user, line in zip(["u1", "u2", "u3"], out.splitlines(), strict=True):
        match = ASSIGN_LINE.match(line)
        assert match, line
        assert int(match["bucket"]) == formula("s1", user)
        assert match["backend"] == backend


def test_assign_refuses_a_bad_config_with_exit_1(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(BAD_CONFIG)

    code, out, err = run_main(["assign", "--config", str(path), "alice"], capsys)

    assert code == 1
    assert out == ""
    assert "rollout.percentage: must be between 0 and 100, got 150" in err


# Usage errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["nope"], ["check"], ["check", "--config"],
                                  ["assign", "--config", "x.yaml"], ["assign", "alice"],
                                  ["check", "--config", "x.yaml", "--bogus"]])
def test_usage_error_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(argv, capsys)

    assert code == 2
    assert out == ""
    assert "usage: rollout-proxy" in err


def test_console_script_usage_error_exits_2(tmp_path: Path) -> None:
    result = cli("check", cwd=tmp_path)

    assert result.returncode == 2
    assert "--config" in result.stderr
