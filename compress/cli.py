"""Entry points: `compress run [hydra overrides]`, `compress report | compare | plot DIR...` and
`compress export RUN_DIR`."""
from __future__ import annotations

import argparse
import itertools
import logging
import os
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
    """Hydra's and OmegaConf's composition errors are multi-line; keep the line a user can act on,
    naming the key."""
    text = f"{e}\n{e.__cause__ or ''}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    if any("is not in struct" in ln or "not in '" in ln for ln in lines) and lines[0].startswith("Could not override"):
        key = lines[0].split("'")[1]
        return f"{key}: unknown config option (add new keys with +{key}=...)"
    if lines and lines[0].startswith("Error merging override") and len(lines) > 1:
        key = full_key or lines[0].removeprefix("Error merging override").split("=")[0].strip()
        return f"{key}: {lines[1]}"
    options_at = next((i for i, ln in enumerate(lines) if ln.startswith("Available options")), None)
    if options_at is not None:  # an unknown group option: name the ones there are
        options = [ln for ln in lines[options_at + 1:] if not ln.startswith(("Config search path", "provider="))]
        return f"{' '.join(lines[:options_at + 1])} {', '.join(options)}"
    if lines and lines[0].startswith("In ") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return (f"{full_key}: " if full_key and lines and not lines[0].startswith(full_key) else "") + (
        lines[0][:300] if lines else type(e).__name__)


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

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:
        for line in overrides:  # name the override that does not parse
            try:
                parser.parse_overrides([line])
            except Exception as one:
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
            _fail(f"hparams_search: a search is a multirun (a run per trial): use `compress run -m hparams_search={o.value()} ...`")
        if o.key_or_group in GROUPS and not o.is_sweep_override() and (
                not isinstance(o.value(), str) or "${" in o.value()):
            _fail(f"{o.key_or_group}: must name one of its presets, got {o.input_line.split('=', 1)[-1]!r}")
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
    except Exception as e:
        _fail(_hydra_message(e))
    try:
        to_config(cfg)  # ranges and choices: fail before Hydra makes a run directory
    except CompressError as e:
        _fail(str(e))
    _check_parallel_threads(parsed, cfg)
    if any(o.key_or_group == "hparams_search" and o.value() not in (None, "null") for o in parsed):
        _precheck_search(plain, [o.input_line for o in parsed if o.key_or_group.startswith("hydra")
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


def _precheck_search(plain: list[str], hydra_overrides: list[str]) -> None:
    """`hparams_search=<name>` (configs/hparams_search/, compress/job/search.py): the objective's settings and
    the searched parameters' ends, checked before the first trial starts."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from compress.config import to_config
    from compress.job.search import KEY, SearchObjective

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
                for value in _search_values(f"{key}={spec}"):
                    try:
                        to_config(compose(config_name="config", overrides=[*plain, f"{key}={value}"]))
                    except CompressError as e:
                        _fail(f"hydra.sweeper.params: {key}={spec} takes {value}: {e}")
                    except Exception as e:
                        _fail(f"hydra.sweeper.params: {key}={spec}: {_hydra_message(e)}")
    except CompressError as e:
        _fail(str(e))
    except SystemExit:
        raise
    except Exception as e:
        _fail(_hydra_message(e))


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from compress.training import distributed
    from compress.config import to_config
    from compress.job.pipeline import Run

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

    from compress.config import register_configs
    from compress.job.runtime import tune_allocator

    tune_allocator()  # freed tensors are reused instead of page-faulted in again (compress/job/runtime.py)
    register_configs()
    argv = _data_parallel_argv(argv)
    if not any(a in ("-h", "--help", "--hydra-help", "--info", "--cfg", "-c") or a.startswith("--") for a in argv):
        _precheck([a for a in argv if not a.startswith("-")], multirun=any(a in ("-m", "--multirun") for a in argv))
    # SIGTERM (kill) ends the run like Ctrl-C: the current stage stops, written files stay complete.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    main_fn = hydra.main(config_path="pkg://compress.configs", config_name="config", version_base="1.3")(_task)
    sys.argv = ["compress", *argv]
    main_fn()


def report(argv: list[str]) -> None:
    from compress.report.results import gather

    p = _parser("compress report", "Gather every metrics.csv below DIRs (one line per stage).")
    p.epilog = ("--summary [--mean-over KEYS]: one line per run instead (mean and spread over the runs that "
                "differ only in KEYS, e.g. seed); see `compress report --summary --help`")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("report.csv"), help="CSV to write (default report.csv)")
    p.add_argument("--columns", default="run_dir,experiment,overrides,method,arch,stage,status,top1,top1_delta,params,params_reduction_pct,"
                   "macs,macs_reduction_pct,latency_ms_b1,size_bytes", help="comma-separated columns to print")
    args = p.parse_args(argv)
    for d in args.dirs:
        if not d.exists():
            _fail(f"{d}: no such directory")
    table = gather(args.dirs)
    if table is None:
        _fail(f"no metrics.csv below {', '.join(map(str, args.dirs))}")
    table.to_csv(args.output, index=False)
    cols = [c for c in args.columns.split(",") if c in table.columns]
    print(table[cols].to_markdown(index=False, floatfmt=".2f"))
    print(f"\n{len(table)} rows from {table['run_dir'].nunique()} runs -> {args.output}")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser whose usage errors are one line and exit 2, like every other error."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.error = lambda message: _fail(f"{prog}: {message}")  # type: ignore[method-assign]
    return p


def _runs_below(dirs: list[Path]):
    """Every metrics.csv below `dirs` (compress.report.results.gather); a missing DIR or none found is one line."""
    from compress.report.results import gather

    for d in dirs:
        if not d.exists():
            _fail(f"{d}: no such directory")
    try:
        table = gather(dirs)
    except CompressError as e:
        _fail(str(e))
    if table is None:
        _fail(f"no metrics.csv below {', '.join(map(str, dirs))}")
    return table


def report_summary(argv: list[str]) -> None:
    """`compress report DIR... --summary`: one line per run instead of one per stage."""
    from compress.report import compare

    p = _parser("compress report --summary", "One line per run: baseline -> final top-1, reductions, wall time.")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--summary", action="store_true", help="one line per run (this table)")
    p.add_argument("--mean-over", metavar="KEYS", help="merge the runs that differ only in these comma-separated "
                   "override keys (e.g. seed): mean, spread, min and max of the final top-1")
    p.add_argument("-o", "--output", type=Path, help="also write the table: FILE.csv or FILE.md")
    args = p.parse_args(argv)
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".md"):
        _fail(f"{args.output}: -o must end with .csv or .md")
    keys = [k.strip() for k in (args.mean_over or "").split(",") if k.strip()]
    if args.mean_over is not None and not keys:
        _fail("--mean-over: name at least one override key (e.g. --mean-over seed)")
    try:
        gathered = _runs_below(args.dirs)
        table = compare.summary(gathered)
        runs = len(table)
        if keys:
            table = compare.mean_over(compare.runs(gathered, resolve=lambda name: ""), keys)
            text = compare.markdown(table, compare.MEAN_COLUMNS)
            columns = compare.MEAN_COLUMNS
        else:
            text, columns = compare.summary_markdown(table), compare.SUMMARY_COLUMNS
        if args.output is not None:
            compare.write_table(table, args.output, columns, text)
    except CompressError as e:
        _fail(str(e))
    print(text)
    shown = f"{runs} runs" + (f" in {len(table)} settings (over {', '.join(keys)})" if keys else "")
    print(f"\n{shown}" + (f" -> {args.output}" if args.output is not None else ""))


def compare_runs(argv: list[str]) -> None:
    """`compress compare DIR...`: one line per run beside its linked published row."""
    from compress.report import compare

    p = _parser("compress compare", "Our runs beside the published rows they reproduce (one line per run).")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, help="also write the table: FILE.csv (every column) or FILE.md")
    p.add_argument("--published", type=Path, help="CSV of published rows (default: the package's table)")
    args = p.parse_args(argv)
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".md"):
        _fail(f"{args.output}: -o must end with .csv or .md")
    try:
        runs = _runs_below(args.dirs)
        table = compare.compare(runs, compare.load_published(args.published))
        text = compare.markdown(table, compare.COMPARE_MARKDOWN_COLUMNS)
        if args.output is not None:
            compare.write_table(table, args.output, compare.COMPARE_CSV_COLUMNS, text)
    except CompressError as e:
        _fail(str(e))
    print(text)
    linked = int((table["paper_top1"].notna()).sum())
    print(f"\n{len(table)} runs, {linked} beside a published row" + (f" -> {args.output}" if args.output else ""))


def plot_runs(argv: list[str]) -> None:
    """`compress plot DIR... -o FILE.png`: top-1 vs parameters and vs MACs, one row of panels per arch."""
    from compress.report import compare
    from compress.report import plot

    p = _parser("compress plot", "Top-1 against parameters and MACs: our runs, the papers' rows, the Pareto front.")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("plot.png"), help="FILE.png|.pdf|.svg (default plot.png)")
    p.add_argument("--published", type=Path, help="CSV of published rows (default: the package's table)")
    p.add_argument("--rounds", action="store_true",
                   help="each iterative run's course instead: top-1 and parameters removed, round by round")
    args = p.parse_args(argv)
    try:
        plot.check_output(args.output)
        runs = _runs_below(args.dirs)
        if args.rounds:
            drawn = plot.plot_rounds(runs, compare.load_published(args.published), args.output)
            print(f"{drawn} run{'' if drawn == 1 else 's'}, round by round -> {args.output}")
            return
        published = compare.load_published(args.published)
        table = compare.compare(runs, published)
        if table.empty:
            _fail(f"nothing to plot: the metrics.csv below {', '.join(map(str, args.dirs))} hold no rows")
        rows = plot.plot(table, published, args.output)
    except CompressError as e:
        _fail(str(e))
    finished = int((table["stage"] == "final").sum())
    print(f"{finished} finished runs of {len(table)}, {rows} architecture(s) -> {args.output}")


def export_model(argv: list[str]) -> None:
    """`compress export PATH`: the run's model as an ONNX or TorchScript file, checked against PyTorch."""
    from compress.deploy import export, int8
    from compress.job import sources

    p = _parser("compress export", "Write a run's compressed model as a deployable file and check its outputs.")
    p.add_argument("path", type=Path, help="a run dir (its model.pt) or a model.pt file")
    p.add_argument("--format", default="onnx", choices=export.FORMATS, help="onnx (default) or torchscript")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: model.onnx / model.torchscript.pt beside model.pt)")
    p.add_argument("--images", type=int, default=64, help="images the check runs on (default 64)")
    p.add_argument("--tolerance", type=float, default=export.TOLERANCE, help="largest max-abs logit difference (default 1e-4)")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantisation with ONNX Runtime (onnx only), checked on real test images")
    p.add_argument("--calibration", type=int, default=int8.CALIBRATION_IMAGES,
                   help=f"--int8: training images that calibrate the activation ranges (default {int8.CALIBRATION_IMAGES})")
    p.add_argument("--test-images", type=int, default=int8.CHECK_IMAGES,
                   help=f"--int8: test images of the top-1 check (default {int8.CHECK_IMAGES}, a fixed draw)")
    p.add_argument("--threads", type=int, default=1, help="--int8: ONNX Runtime threads of the timing (default 1)")
    args = p.parse_args(argv)
    if not 1 <= args.images <= 10_000:
        _fail(f"--images: {args.images} is not in [1, 10000]")
    if not 0 <= args.tolerance < float("inf"):
        _fail(f"--tolerance: {args.tolerance} is not a number >= 0")
    if args.int8:
        if args.format != "onnx":
            _fail(f"--int8: an int8 file is ONNX only (--format onnx), not {args.format}")
        if not 1 <= args.calibration <= 100_000:
            _fail(f"--calibration: {args.calibration} is not in [1, 100000]")
        if not 1 <= args.test_images <= 1_000_000:
            _fail(f"--test-images: {args.test_images} is not in [1, 1000000]")
        if not 1 <= args.threads <= 128:
            _fail(f"--threads: {args.threads} is not in [1, 128]")
    saved = sources.load_saved(args.path)
    folder = args.path if args.path.is_dir() else args.path.parent
    if args.int8:
        export_int8(saved, args, args.output or folder / "model.int8.onnx")
        return
    output = args.output or folder / ("model.onnx" if args.format == "onnx" else "model.torchscript.pt")
    images, images_from = sources.check_images(saved, args.images)
    done = export.export(saved.model, args.format, output, saved.input_shape, images, images_from, args.tolerance)
    print(f"{done.path}: {done.fmt}, {done.size_bytes:,} bytes ({saved.arch}, method {saved.method}); "
          f"checked on {done.images_from}: {done.criterion}")


def export_int8(saved, args, output: Path) -> None:
    """`compress export --int8`: quantise, check top-1 against the float file, time both, then write."""
    import torch

    from compress.deploy import int8
    from compress.job import sources

    data = sources.run_data(saved)
    if data is None:
        _fail(f"--int8: {args.path}: the run's data set cannot be found here (calibration and the top-1 check "
              "need real images)")
    torch.set_num_threads(args.threads)
    calibration, _ = int8.draw(data.train, args.calibration)
    images, labels = int8.draw(data.test, args.test_images)
    images_from = f"{len(images)} test images of {data.source}"
    done = int8.build(saved.model, saved.input_shape, calibration, images, labels, images_from, threads=args.threads)
    int8.write(done.blob, output)
    print(f"CPU: {done.cpu}; reduce_range {'on (no VNNI: 7-bit weights, no uint8 x int8 saturation)' if done.reduce_range else 'off (VNNI/AMX int8 dot products)'}")
    print(f"{output}: int8 onnx (QOperator, uint8 activations, per-channel int8 weights"
          f"{', reduce_range' if done.reduce_range else ''}), {len(done.blob):,} bytes ({saved.arch}, method "
          f"{saved.method}); calibrated on {done.calibration} training images"
          + (f", {done.fake_quant_scales} activation scales from the model's fake quantisers" if done.fake_quant_scales else ""))
    print(f"top-1 on {images_from}: int8 {done.int8_top1:.2f}, float {done.float_top1:.2f} "
          f"(tolerance {int8.INT8_TOLERANCE:g} point)")
    print(f"ONNX Runtime speed-up over the float export, {args.threads} thread(s), timed interleaved on "
          f"{done.cpu}: batch 1 {done.speedup[1]:.2f}x ({done.float_ms[1]:.3f} -> {done.int8_ms[1]:.3f} ms), "
          f"batch 64 {done.speedup[64]:.2f}x ({done.float_ms[64]:.2f} -> {done.int8_ms[64]:.2f} ms)")


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        run(rest)
    elif cmd in ("report", "compare", "plot", "export"):
        if cmd == "report":
            command = report_summary if "--summary" in rest else report
        else:
            command = {"compare": compare_runs, "plot": plot_runs, "export": export_model}[cmd]
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
