"""Entry points: `compress run [hydra overrides]`, `compress report | compare | plot DIR...` and
`compress export RUN_DIR`."""
from __future__ import annotations

import itertools
import logging
import os
import reprlib
import signal
import sys
from pathlib import Path

from compress import CompressError

log = logging.getLogger("compress")
USAGE = """usage: compress run [-m] [key=value ...]     compress a model (Hydra overrides; -m sweeps)
       compress report DIR [DIR ...] [-o FILE]  gather metrics.csv files below DIRs into one table
       compress report DIR [DIR ...] --summary [-o FILE.csv|.md]  one line per run
       compress compare DIR [DIR ...] [-o FILE.csv|.md] [--published FILE]  our runs beside the papers' rows
       compress plot DIR [DIR ...] [-o FILE.png] [--published FILE]  top-1 vs params and MACs, Pareto front
       compress export RUN_DIR|model.pt [--format onnx|torchscript] [-o FILE]  a deployable file, checked
       compress export RUN_DIR|model.pt --format onnx --int8 [--calibration N]  an int8 ONNX file (docs/int8.md)"""


MAX_MESSAGE = 300  # characters: a hostile value must not turn the one line into a page


def _fail(msg: str) -> None:
    msg = " ".join(msg.split())  # one line, whatever the value held
    if len(msg) > MAX_MESSAGE:
        msg = msg[: MAX_MESSAGE - 1] + "…"
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _to_log_file(msg: str) -> None:
    """Into the run's log file only: the console gets the one-line error from _fail."""
    record = logging.LogRecord("compress", logging.ERROR, __file__, 0, msg, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def _hydra_message(e: BaseException) -> str:
    """The line a user can act on, naming the key, from Hydra's and OmegaConf's exception types (their
    messages are multi-line and worded for developers): an unknown key, a value of the wrong type, an
    unknown group option (with the ones there are), an override that does not parse."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    def first_line(error: BaseException) -> str:
        return next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)

    cause = e.__cause__
    if isinstance(e, MissingConfigException):
        group = (e.missing_cfg_file or "").rpartition("/")[0]
        options = f" Available options in '{group}': {', '.join(e.options)}" if e.options else ""
        return first_line(e) + options
    unknown = e if isinstance(e, (ConfigAttributeError, ConfigKeyError)) else cause
    if isinstance(unknown, (ConfigAttributeError, ConfigKeyError)) and unknown.full_key:
        return f"{unknown.full_key}: unknown config option{_unknown_key_hint(unknown)}"
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{cause.full_key}: {first_line(cause)}"
    if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
        return f"{e.full_key}: {first_line(e)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("In "):  # Hydra's defaults-list errors: where, then what
        return f"{lines[0]} {lines[1]}"
    return first_line(e)[:300]


def _unknown_key_hint(e) -> str:
    """The " (did you mean ...?)" of an unknown key: a group's option given as a key (`smoke=true` for
    `debug=smoke`), else the closest keys of the schema it was looked up in. Every key a run reads is in
    the typed schemas, so adding one with `+key=` is never the fix (compress.checks.unknown_key)."""
    import dataclasses
    import difflib
    from importlib import resources

    key = str(e.full_key)
    parent, _, name = key.rpartition(".")
    if not parent:
        configs = resources.files("compress.configs")
        groups = [g for g in GROUPS if "@" not in g and configs.joinpath(g, f"{name}.yaml").is_file()]
        if groups:
            return f" (did you mean {groups[0]}={name}?)"
    schema = getattr(e, "object_type", None)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(f'{parent}.{c}' if parent else c for c in close)}?)" if close else ""


def _hydra_errors() -> tuple[type[BaseException], ...]:
    """What composing a config can raise for a bad override: Hydra's and OmegaConf's own error types."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException)


GROUPS = ("dataset", "arch", "method", "schedule", "schedule@pretrain", "experiment", "debug", "hparams_search")
OPTIONAL_GROUPS = ("experiment", "debug", "hparams_search")


def _check_optional_groups(overrides: list[str]) -> None:
    """`experiment`, `debug` and `hparams_search` are optional groups: Hydra would silently run the default
    job for a misspelt option. Inside an initialised Hydra context."""
    import difflib

    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    for line in overrides:
        key, _, value = line.partition("=")
        key = key.lstrip("+~")
        if key in OPTIONAL_GROUPS and value and value != "null":
            options = loader.get_group_options(key)
            if value not in options:
                close = difflib.get_close_matches(value, options, n=3, cutoff=0.6)
                _fail(f"{key}: no option '{value}'" + (f" (did you mean: {', '.join(close)}?)" if close else
                                                      f" ({len(options)} options: compress run --help lists them)"))


PARALLEL_LAUNCHERS = ("parallel", "joblib")  # hydra/launcher options that run several runs at once on this machine


def _check_parallel_threads(parsed, cfg) -> None:
    """A parallel local sweep must say how many threads each run takes: PyTorch would otherwise give every
    run one thread per core, and oversubscribed cores made a step up to 8x slower on the 2-core CI machine."""
    launcher = next((o.value() for o in parsed if o.key_or_group == "hydra/launcher"), None)
    if launcher in PARALLEL_LAUNCHERS and cfg.get("threads") is None:
        jobs = next((o.value() for o in parsed if o.key_or_group == "hydra.launcher.n_jobs"), None) or 2
        share = max(1, (os.cpu_count() or 1) // int(jobs)) if str(jobs).lstrip("-").isdigit() and int(jobs) > 0 else 1
        _fail(f"threads: hydra/launcher={launcher} runs several runs at once; give each its share of the cores "
              f"(threads={share} for {jobs} jobs on {os.cpu_count()} cores)")


def _precheck(overrides: list[str], multirun: bool) -> None:
    """Compose the config once before Hydra runs, so that an unknown key or option fails with one line.
    Sweep values (a,b / glob() / range()) are left to Hydra's multirun."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    errors = _hydra_errors()
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except errors as e:
        for line in overrides:  # name the override that does not parse
            try:
                parser.parse_overrides([line])
            except errors as one:
                _fail(f"{line.split('=', 1)[0].lstrip('+~')}: cannot parse {line!r}: {_hydra_message(one)}")
        _fail(f"could not parse overrides: {_hydra_message(e)}")
    from hydra.core.override_parser.types import ChoiceSweep

    plain = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override() and not multirun:
            _fail(f"{o.key_or_group}: a sweep value ({o.input_line.split('=', 1)[-1]}) needs `compress run -m`")
        if o.key_or_group == "hparams_search" and not multirun and o.value() not in (None, "null"):
            _fail("hparams_search: a search is a multirun (a run per trial): use "
                  f"`compress run -m hparams_search={o.value()} ...`")
        if o.key_or_group in GROUPS and not o.is_sweep_override() and (
                not isinstance(o.value(), str) or "${" in o.value()
                or max(map(len, o.value().split("/"))) > 200):  # past a file name's length the OS refuses the lookup
            _fail(f"{o.key_or_group}: must name one of its presets, got {reprlib.repr(o.input_line.split('=', 1)[-1])}")
        if not o.is_sweep_override():
            plain.append(o.input_line)
        elif isinstance(o.value(), ChoiceSweep):
            # A sweep a,b,c: its first job's value stands for all (Hydra checks each job again).
            plain.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            return  # glob() / range() sweeps need Hydra's own expansion: leave every check to it
    from compress.config import to_config

    try:
        with initialize_config_module(config_module="compress.configs", version_base="1.3"):
            _check_optional_groups(plain)
            cfg = compose(config_name="config", overrides=plain)
    except errors as e:
        _fail(_hydra_message(e))
    try:
        to_config(cfg)  # ranges and choices: fail before Hydra makes a run directory
    except CompressError as e:
        _fail(str(e))
    _check_parallel_threads(parsed, cfg)
    if any(o.key_or_group == "hparams_search" and o.value() not in (None, "null") for o in parsed):
        _precheck_search(cfg, plain, [o.input_line for o in parsed if o.key_or_group.startswith("hydra")
                                      and not o.is_sweep_override()])


def _search_values(line: str) -> list[str]:
    """The values of a searched parameter (`key=interval(a, b)`, a choice or range sweep, or one value) to
    check before the search starts: an interval's two ends, a sweep's first few values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    o = OverridesParser.create().parse_override(line)
    value = o.value()
    if isinstance(value, IntervalSweep):
        ends = [value.start, value.end]
        return [str(int(v)) if "int" in value.tags else repr(float(v)) for v in ends]
    if o.is_sweep_override():
        return list(itertools.islice(o.sweep_string_iterator(), 5))
    return [o.get_value_element_as_str()]


def _precheck_search(cfg, plain: list[str], hydra_overrides: list[str]) -> None:
    """`hparams_search=<name>` (configs/hparams_search/, compress/job/search.py): the objective's settings and
    the searched parameters' ends, checked before the first trial starts. `cfg` is the job's composed config:
    a searched value is set on a copy of it and checked by the typed schema and `to_config`, so only a
    searched config group (which changes the defaults list) is composed again."""
    import copy

    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from compress.config import to_config
    from compress.job.search import KEY, SearchObjective

    errors = _hydra_errors()
    parser = OverridesParser.create()
    try:
        with initialize_config_module(config_module="compress.configs", version_base="1.3"):
            full = compose(config_name="config", overrides=plain + hydra_overrides, return_hydra_config=True)
            settings = OmegaConf.select(full, KEY)
            if settings is not None and settings.get("_target_") == "compress.job.search.SearchObjective":
                options = {k: v for k, v in OmegaConf.to_container(settings, resolve=True).items() if k != "_target_"}
                try:
                    SearchObjective(**options)
                except TypeError as e:
                    _fail(f"{KEY}: {e} (its keys: max_drop, metric, accuracy, penalty)")
            params = OmegaConf.to_container(full.hydra.sweeper.get("params") or {}, resolve=True)
            for key, spec in params.items():
                name = key.lstrip("+~")
                for value in _search_values(f"{key}={spec}"):
                    try:
                        if name in GROUPS:
                            trial = compose(config_name="config", overrides=[*plain, f"{key}={value}"])
                        else:
                            trial = copy.deepcopy(cfg)
                            OmegaConf.update(trial, name, parser.parse_override(f"{name}={value}").value(),
                                             merge=False)
                        to_config(trial)
                    except CompressError as e:
                        _fail(f"hydra.sweeper.params: {key}={spec} takes {value}: {e}")
                    except errors as e:
                        _fail(f"hydra.sweeper.params: {key}={spec}: {_hydra_message(e)}")
    except CompressError as e:
        _fail(str(e))
    except errors as e:
        _fail(_hydra_message(e))


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from compress.config import to_config
    from compress.job.pipeline import Run
    from compress.training import distributed

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger("compress").setLevel(logging.WARNING)  # data-parallel: rank 0 tells the story
    try:
        hc = HydraConfig.get()
        # Rows say which experiment and overrides made them, so the runs of a sweep can be told apart.
        Run(to_config(cfg), run_dir, experiment=hc.runtime.choices.get("experiment") or "",
            overrides=hc.job.override_dirname).execute()
    except CompressError as e:
        _to_log_file(f"error: {e}")
        _fail(str(e))
    except (MemoryError, RuntimeError) as e:
        # Out of memory (a batch size too large for this machine) is the user's setting, not a bug: one line.
        # Files already written stay complete (every write is atomic), so the run resumes with resume=true.
        if not isinstance(e, MemoryError) and not _is_out_of_memory(e):
            raise
        msg = ("schedule.batch_size: out of memory "
               f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); lower schedule.batch_size, "
               f"pretrain.batch_size or measure.eval_batch_size, then resume with resume=true hydra.run.dir={run_dir}")
        _to_log_file(f"error: {msg}")
        _fail(msg)
    except KeyboardInterrupt:
        log.warning("interrupted; files in %s are complete: continue with resume=true hydra.run.dir=%s", run_dir, run_dir)
        print(f"interrupted: continue with: compress run <same overrides> resume=true hydra.run.dir={run_dir}",
              file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.teardown()  # leave torchrun's process group (a no-op in one process)


def _data_parallel_argv(argv: list[str]) -> list[str]:
    """Under torchrun (compress/training/distributed.py): one run, in one run dir that every rank names, whose
    .hydra/ and log rank 0 alone writes."""
    from compress.training import distributed

    try:
        if not distributed.launched():
            return argv
    except CompressError as e:
        _fail(str(e))
    if any(a in ("-m", "--multirun") for a in argv):
        _fail("-m: a data-parallel run (torchrun) is one run; start one torchrun per run of the sweep")
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        _fail("hydra.run.dir: a data-parallel run (torchrun) needs the run dir named, the same for every rank: "
              "add hydra.run.dir=DIR")
    if os.environ.get("RANK", "0") != "0":
        return [*argv, "hydra.output_subdir=null"]
    return argv


def run(argv: list[str]) -> None:
    import hydra

    from compress.job.compose import register_configs
    from compress.runtime import tune_allocator

    tune_allocator()  # freed tensors are reused instead of page-faulted in again (compress/runtime.py)
    register_configs()
    argv = _data_parallel_argv(argv)
    if not any(a in ("-h", "--help", "--hydra-help", "--info", "--cfg", "-c") or a.startswith("--") for a in argv):
        _precheck([a for a in argv if not a.startswith("-")], multirun=any(a in ("-m", "--multirun") for a in argv))
    # SIGTERM (kill) ends the run like Ctrl-C: the current stage stops, written files stay complete.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    main_fn = hydra.main(config_path="pkg://compress.configs", config_name="config", version_base="1.3")(_task)
    sys.argv = ["compress", *argv]
    main_fn()


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        run(rest)
    elif cmd in ("report", "compare", "plot", "export"):
        from compress.commands import export as deploy
        from compress.commands import report as reporting

        if cmd == "report":
            command = reporting.report_summary if "--summary" in rest else reporting.report
        else:
            command = {"compare": reporting.compare_runs, "plot": reporting.plot_runs, "export": deploy.export_model}[cmd]
        try:
            command(rest)
        except CompressError as e:  # e.g. an unreadable metrics.csv below DIR
            _fail(str(e))
        except BrokenPipeError:  # `compress report ... | head`
            sys.stderr.close()
    else:
        _fail(f"unknown command '{cmd}'\n{USAGE}")


if __name__ == "__main__":
    main()
