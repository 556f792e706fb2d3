"""Entry points: `compress run [hydra overrides]` and `compress report DIR...`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from compress import CompressError

log = logging.getLogger("compress")
USAGE = """usage: compress run [-m] [key=value ...]     compress a model (Hydra overrides; -m sweeps)
       compress report DIR [DIR ...] [-o FILE]  gather metrics.csv files below DIRs into one table"""


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _to_log_file(msg: str) -> None:
    """Into the run's log file only: the console gets the one-line error from _fail."""
    record = logging.LogRecord("compress", logging.ERROR, __file__, 0, msg, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def _hydra_message(e: Exception) -> str:
    """Hydra's composition errors are multi-line; keep the line a user can act on."""
    text = f"{e}\n{e.__cause__ or ''}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any("is not in struct" in ln for ln in lines):
        key = next((ln.split("'")[1] for ln in lines if ln.startswith("Could not override '")), None)
        key = key or next(ln.split("'")[1] for ln in lines if "is not in struct" in ln and "'" in ln)
        return f"{key}: unknown config option (add new keys with +{key}=...)"
    if lines and lines[0].startswith("In ") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(e).__name__


def _precheck(overrides: list[str]) -> None:
    """Compose the config once before Hydra runs, so that an unknown key or option fails with one line.
    Sweep values (a,b / glob() / range()) are left to Hydra's multirun."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        _fail(f"could not parse overrides: {_hydra_message(e)}")
    from hydra.core.override_parser.types import ChoiceSweep

    plain = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if not o.is_sweep_override():
            plain.append(o.input_line)
        elif isinstance(o.value(), ChoiceSweep):
            # A sweep a,b,c: its first job's value stands for all (Hydra checks each job again).
            plain.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            return  # glob() / range() sweeps need Hydra's own expansion: leave every check to it
    try:
        with initialize_config_module(config_module="compress.configs", version_base="1.3"):
            compose(config_name="config", overrides=plain)
    except Exception as e:
        _fail(_hydra_message(e))


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from compress.pipeline import Run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        hc = HydraConfig.get()
        # Rows say which experiment and overrides made them, so the runs of a sweep can be told apart.
        plain["experiment"] = hc.runtime.choices.get("experiment")
        plain["overrides"] = hc.job.override_dirname
        Run(plain, run_dir).execute()
    except CompressError as e:
        _to_log_file(f"error: {e}")
        _fail(str(e))
    except KeyboardInterrupt:
        log.warning("interrupted; files in %s are complete: continue with resume=true hydra.run.dir=%s", run_dir, run_dir)
        print(f"interrupted: continue with: compress run <same overrides> resume=true hydra.run.dir={run_dir}",
              file=sys.stderr)
        sys.exit(130)


def run(argv: list[str]) -> None:
    import hydra

    from compress.runtime import tune_allocator

    tune_allocator()  # freed tensors are reused instead of page-faulted in again (compress/runtime.py)

    if not any(a in ("-h", "--help", "--hydra-help", "--info", "--cfg", "-c") or a.startswith("--") for a in argv):
        _precheck([a for a in argv if not a.startswith("-")])
    # SIGTERM (kill) ends the run like Ctrl-C: the current stage stops, written files stay complete.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    main_fn = hydra.main(config_path="pkg://compress.configs", config_name="config", version_base="1.3")(_task)
    sys.argv = ["compress", *argv]
    main_fn()


def report(argv: list[str]) -> None:
    from compress.results import gather

    p = argparse.ArgumentParser(prog="compress report", description="Gather every metrics.csv below DIRs.")
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


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        run(rest)
    elif cmd == "report":
        try:
            report(rest)
        except BrokenPipeError:  # `compress report ... | head`
            sys.stderr.close()
    else:
        _fail(f"unknown command '{cmd}'\n{USAGE}")


if __name__ == "__main__":
    main()
