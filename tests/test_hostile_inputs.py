"""Hostile values for every key of every config group: `compress run` either accepts the value (and the run
starts) or stops at once with exit 2 and exactly one short line on stderr that names the key — never a
traceback, a hang, or unbounded memory (issue 11).

Two levels:
- in process, most values: `cli_in_process` (tests/conftest.py) answers `compress run <overrides>` with
  the real `compress.cli.main()` in one long-lived, memory-capped (RLIMIT_AS) process with the pipeline's
  `Run.execute` stubbed out: parsing, composition, the typed config's checks, building the method and
  `Run`'s own checks are the real code; only the stages are skipped. Each case has a time bound; a process
  that dies (memory) or hangs is a failed case.
- through the CLI, a handful: `python -m compress.cli run ... debug=smoke` as a user runs it, time and
  memory bounded; the value then also reaches the stages (data, threads, seeds, the rate applied to the
  model). A run that is still going at the time bound passes only if it has loaded its data (started).

`make test`: a derandomised hypothesis search (40 cases) in process and the fixed CLI cases (~25 s).
`make test-full` (slow) adds every key once (each a different kind of value), every key with each of the
12 core values, a longer hypothesis search in process and a hypothesis search through the CLI.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.config import Config
from compress.methods import METHODS
from tests.conftest import REPO, InProcessCLI, limit_memory

CLI_TIMEOUT = 60.0          # seconds for one `compress run` (imports ~4 s, a smoke run ~10 s)
MAX_LINE = 1000             # characters: the one line must stay readable whatever the value


# -- every key ------------------------------------------------------------------------------------------------
def _leaf_keys(cls, prefix: str = ""):
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                yield from _leaf_keys(type(default), f"{prefix}{f.name}.")
                continue
        if f.name != "method":
            yield f"{prefix}{f.name}"


def _selectors(name: str) -> tuple[str, ...]:
    """`method=<name>`, with rounds for a method that only runs in rounds (else that error comes first)."""
    return (f"method={name}", "schedule.rounds=1") if METHODS[name].requires_rounds else (f"method={name}",)


# (key, the overrides that select its group option): every key of the typed config, every method's
# options under its own `method=<name>`, and the group choices themselves.
KEYS: list[tuple[str, tuple[str, ...]]] = (
    [(k, ()) for k in _leaf_keys(Config)]
    + [(f"method.{f.name}", _selectors(name)) for name in sorted(METHODS)
       for f in dataclasses.fields(METHODS[name].Options)]
    + [(group, ()) for group in ("dataset", "arch", "method", "schedule", "schedule@pretrain", "experiment", "debug")]
)

# Values as a user types them after `key=`.
HOSTILE: list[str] = [
    "abc",                                   # non-numeric string
    "-1",                                    # negative
    "99999999999999999999999999999",         # huge int (beyond int64)
    "true",                                  # boolean
    "",                                      # empty (`key=`)
    "[[1,[2,[3]]],[],{a:1}]",                # nested lists
    "x" * 5000,                              # very long string
    "'[0.1]*99999999999'",                   # a rate string that expands without bound
    "nan",
    "-inf",
    "1e999",
    "'ünïcødé 💥 \u202e'",                  # unicode, right-to-left override
    "-0.5",
    "false",
    "'[0.]+[0.18]*29'",                      # a real rate string, for every key
    "''",                                    # the empty string, quoted
    "{}",
    "null",
    "'a\nb'",                                # a newline inside the value: still one line of error
    "${undefined_key}",                      # an interpolation to nothing
    "${oc.env:HOME}",
    "9223372036854775808",                   # 2**63
    "0",
    "1.5",
    "'[0.1]*29+[0.2]*99999999999'",
    "'[0.5]**99'",
    "glob(*)",                               # sweep syntax in a single run
]


# One of each kind, for the sweep of every key with every kind (slow).
CORE = ["abc", "-1", "99999999999999999999999999999", "true", "", "[[1,[2,[3]]],[],{a:1}]", "x" * 5000,
        "'[0.1]*99999999999'", "nan", "-inf", "'ünïcødé 💥 \u202e'", "'a\nb'"]
assert set(CORE) <= set(HOSTILE)


def rendered_case(key: str, selectors: tuple[str, ...], value: str) -> list[str]:
    return [*selectors, f"{key}={value}"]


# -- hypothesis strategies for values -------------------------------------------------------------------
def _quoted(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
_scalar = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(2**200), max_value=2**200).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.booleans().map(lambda b: str(b).lower()),
    _text,
    _text.map(_quoted),
)
_listy = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
                      max_leaves=8)
_rate = st.builds(lambda head, rate, n: _quoted(f"{head}[{rate}]*{n}"), st.sampled_from(["", "[0.]+", "[0.1]*3+"]),
                  st.sampled_from(["0.1", "0.5", "1", "-1", "nan", "1e999", "[0.1]"]),
                  st.one_of(st.integers(0, 40), st.integers(10**6, 10**30)))
VALUES = st.one_of(st.sampled_from(HOSTILE), _scalar, _listy, _rate)


# -- the in-process worker: tests/conftest.py (`cli_in_process`, shared with test_pipeline.py) ----------------
@pytest.fixture(scope="module")
def worker(cli_in_process):
    return cli_in_process


def problem(key: str, result: dict, strict_key: bool = True) -> str | None:
    """Why an outcome breaks the rule (None: it keeps it). Exit 0, or exit 2 with one short line on
    stderr that starts with `error:` and names the key (`strict_key`; at run time, when the stages ran, a
    resource error may rightly name another key, e.g. `schedule.batch_size: out of memory`, so there the
    line need only start with `error: <some key or file>: `)."""
    code, stderr = result["code"], result["stderr"]
    if code == 0:
        return None
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if code != 2:
        tail = (result.get("traceback") or stderr).strip().splitlines()[-8:] or ["(no output)"]
        return f"exit {code}: " + " | ".join(ln.strip() for ln in tail)
    if len(lines) != 1:
        return f"exit 2 with {len(lines)} lines on stderr: {stderr.strip()[:300]!r}"
    line = lines[0]
    if not line.startswith("error: ") or len(line) > MAX_LINE:
        return f"exit 2 but the line is not a short `error:` line ({len(line)} chars): {line[:200]!r}"
    leaf = key.split("@")[0].split(".")[-1]
    if strict_key and leaf not in line:
        return f"exit 2 but the line does not name {key}: {line[:200]!r}"
    if not strict_key and not re.match(r"error: [^\s:]+: ", line):
        return f"exit 2 but the line does not start with the key or file at fault: {line[:200]!r}"
    return None


def check(worker: InProcessCLI, key: str, selectors: tuple[str, ...], value: str) -> str | None:
    result = worker.run(["run", *rendered_case(key, selectors, value)])
    why = problem(key, result)
    return None if why is None else f"{' '.join(rendered_case(key, selectors, value))[:160]!r}: {why}"


# -- in process: every key ----------------------------------------------------------------------------------
def test_every_key_is_covered():
    keys = {k for k, _ in KEYS}
    assert {"seed", "device", "threads", "resume", "dataset.val_size", "arch.checkpoint", "schedule.lr",
            "pretrain.epochs", "measure.latency_repeats", "method.compress_rate", "method.harmonics", "method.pr",
            "method.ae_samples", "method.terms"} <= keys
    assert {sel[0] for _, sel in KEYS if sel} == {f"method={m}" for m in METHODS}


@pytest.mark.slow  # ~161 cases x ~0.2 s
def test_every_key_once_with_a_hostile_value(worker):
    """Each key gets one hostile value, the kinds taking turns down the key list."""
    failures = [why for i, (key, sel) in enumerate(KEYS) if (why := check(worker, key, sel, HOSTILE[i % len(HOSTILE)]))]
    assert not failures, f"{len(failures)} of {len(KEYS)} cases:\n" + "\n".join(failures)


@pytest.mark.slow  # ~161 keys x 12 values x ~0.2 s
@pytest.mark.parametrize("value", CORE, ids=lambda v: repr(v[:24]))
def test_every_key_with_each_core_hostile_value(worker, value):
    failures = [why for key, sel in KEYS if (why := check(worker, key, sel, value))]
    assert not failures, f"{len(failures)} of {len(KEYS)} keys:\n" + "\n".join(failures)


def _search(worker, case):
    (key, sel), value = case
    why = check(worker, key, sel, value)
    assert why is None, why


_CASES = st.tuples(st.sampled_from(KEYS), VALUES)
# No example database: it would be a .hypothesis/ folder in the working tree; a failure prints its example.
_SETTINGS = dict(deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=40, derandomize=True, **_SETTINGS)
@given(case=_CASES)
def test_hypothesis_search_in_process(worker, case):
    _search(worker, case)


@pytest.mark.slow
@settings(max_examples=600, **_SETTINGS)
@given(case=_CASES)
def test_hypothesis_search_in_process_long(worker, case):
    _search(worker, case)


# -- through the CLI ----------------------------------------------------------------------------------------------
def cli(tmp_path: Path, *overrides: str) -> dict:
    """`compress run` in smoke mode with `overrides` last, in a memory-capped process; exit code and stderr."""
    run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    # ResNet-56: the architecture of the default job, for which every method's defaults hold (the paper rate).
    args = [sys.executable, "-m", "compress.cli", "run", "debug=smoke", "arch=resnet56", "method=none", "threads=1",
            f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", *overrides]
    started = time.monotonic()
    try:
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                              preexec_fn=limit_memory, env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        # Accepted values may make a legitimately long run (say, 1024x1024 images): that is fine once the
        # run has started, i.e. got past every check and loaded its data. A hang before that is not.
        log = run_dir / "compress.log"
        if log.is_file() and "data: " in log.read_text(errors="replace"):
            return {"code": 0, "stderr": "", "traceback": "", "started": True}
        return {"code": "timeout", "stderr": "", "traceback": f"still running after {CLI_TIMEOUT:.0f} s, no data loaded"}
    return {"code": proc.returncode, "stderr": proc.stderr, "traceback": proc.stderr[-2000:],
            "seconds": time.monotonic() - started}


CLI_CASES = [
    ("method.compress_rate", ("method=l1",), "'[0.1]*99999999999'"),   # expands without bound
    ("threads", (), "-1"),                                              # a negative thread count
    ("schedule.lr", (), "abc"),                                         # a non-numeric string
    ("seed", (), "true"),                                               # a boolean for a number
    ("dataset.train_size", (), "10000000"),                             # in range, but 30 GB of synthetic images
    ("method.adam_steps", ("method=approxconv", "method.fit=adam"), "1000000000000"),  # a smoke run stays short
]


@pytest.mark.parametrize("key, selectors, value", CLI_CASES, ids=[f"{k}={v[:20]}" for k, _, v in CLI_CASES])
def test_cli_stops_with_one_line_or_runs(tmp_path, key, selectors, value):
    result = cli(tmp_path, *rendered_case(key, selectors, value))
    why = problem(key, result)
    assert why is None, why
    assert not result.get("started"), f"a smoke run with {key}={value} still running after {CLI_TIMEOUT:.0f} s"


@pytest.mark.slow
@settings(max_examples=25, **_SETTINGS)
@given(case=_CASES)
def test_hypothesis_search_through_the_cli(tmp_path_factory, case):
    (key, sel), value = case
    why = problem(key, cli(tmp_path_factory.mktemp("cli"), *rendered_case(key, sel, value)), strict_key=False)
    assert why is None, f"{' '.join(rendered_case(key, sel, value))[:160]!r}: {why}"
