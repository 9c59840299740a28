"""The subcommands of `transfer-fast`, one function each (args -> exit status), and the
checks every command makes of its outputs before it measures anything."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

from ..errors import TransferFastError

STDOUT = "-"  # as a --json/--csv file: write to stdout


def check_writable(path, *, folder: bool = False) -> None:
    """Raises TransferFastError now, before any measurement, when `path` (an output file,
    or with `folder` an output folder) could not be written: it is a folder where a file
    is meant (or the other way round), or the nearest existing folder above it is not a
    writable folder. Creates nothing; `-` (stdout) and None pass."""
    if path is None or str(path) == STDOUT:
        return
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise TransferFastError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise TransferFastError(f"{path}: is a folder; give a file name")
    probe = path if folder else path.parent
    probe = probe if str(probe) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TransferFastError(f"{path}: cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TransferFastError(f"{path}: cannot write there: {probe} is not writable")


def _check_figure_file(path) -> None:
    """An output figure whose suffix matplotlib cannot write fails now, naming it."""
    if path is None:
        return
    if str(path) == STDOUT:
        raise TransferFastError("--plot needs a file name (a figure is not written to stdout)")
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise TransferFastError(f"{path}: cannot write (Format {fmt!r} is not supported; "
                                f"supported: {', '.join(sorted(supported))})")


def _to_stdout(write, result) -> None:
    """What `write(result, path)` would put in a file, on stdout (one formatter for both)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write(result, Path(tmp) / "out")
        sys.stdout.write(Path(path).read_text(encoding="utf-8"))
    sys.stdout.flush()


def _cmd_measure(args) -> int:
    from ..io.files import refuse_overwriting_inputs
    from ..measure.transferability import transferability
    from ..report.figures import save_figure, transferability_figure
    from ..report.tables import format_table, write_result_csv, write_result_json

    if args.json == STDOUT and args.csv == STDOUT:
        raise TransferFastError("only one of --json and --csv can be '-' (stdout)")
    for path in (args.json, args.csv, args.plot):
        check_writable(path)
    _check_figure_file(args.plot)
    refuse_overwriting_inputs([args.json, args.csv, args.plot],
                              [args.random, args.pretrained, args.finetuned])
    result = transferability(args.random, args.pretrained, args.finetuned, preset=args.preset,
                             metric=args.metric, backend=args.backend, groups=args.groups,
                             classifier=args.classifier, key=args.key, strict=args.strict)
    # With an output on stdout, stdout holds that output alone; the rest goes to stderr.
    log = sys.stderr if STDOUT in (args.json, args.csv) else sys.stdout
    print(format_table(result), file=log)
    for path, write in ((args.json, write_result_json), (args.csv, write_result_csv),
                        (args.plot, lambda r, p: save_figure(transferability_figure(r), p))):
        if path == STDOUT:
            _to_stdout(write, result)
        elif path:
            write(result, path)  # a failed write raises TransferFastError naming the path
            print(f"wrote {path}", file=log)
    return 0


def _cmd_scan(args) -> int:
    from ..pipelines.scan import scan
    from ..pipelines.scan_outputs import figure_format

    if bool(args.manifest) == bool(args.finetuned):
        raise TransferFastError("give fine-tuned checkpoints either as paths or as --manifest")
    check_writable(args.out, folder=True)
    with figure_format(args.format):
        result = scan(args.finetuned, random=args.random, pretrained=args.pretrained,
                      manifest=args.manifest, out=args.out, preset=args.preset,
                      metric=args.metric, backend=args.backend, groups=args.groups,
                      classifier=args.classifier, key=args.key, strict=args.strict,
                      max_memory=args.max_memory,
                      pairwise=args.pairwise, plots=not args.no_plots,
                      progress=not args.no_progress)
    failed = sum(r.status != "ok" for r in result.records)
    if result.rank == 0:
        print(f"{result.done} measured, {result.failed} failed, {result.skipped} already "
              f"done; tables and plots in {result.out}/")
        if failed:
            print(f"{failed} of {len(result.records)} checkpoints failed: see the status and "
                  f"error columns of {result.summary_csv}", file=sys.stderr)
    return 1 if failed else 0


def _allow_user_code(archs, allowed: bool) -> None:
    """`package.module:function` architectures import the user's code: only with
    --allow-code, said aloud, and from the working folder for `python -m` and the
    console script alike."""
    code = sorted({a for a in archs if a and ":" in a})
    if not code:
        return
    if not allowed:
        raise TransferFastError(f"--arch {code[0]} imports code from your environment: add "
                                "--allow-code to allow it")
    _import_from_cwd()
    for arch in code:
        print(f"importing user architecture {arch} (--allow-code)")


def _import_from_cwd() -> None:
    """`python -m` puts the working folder on sys.path, a console script does not (its
    sys.path[0] is the script's bin/): add it, so both import `pkg.mod` alike."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _cmd_gap(args) -> int:
    from ..pipelines.gap_run import run_gap

    _allow_user_code([args.arch], args.allow_code)
    check_writable(args.out, folder=True)
    check_writable(args.save_stats)
    run_gap(args.model, args.arch, args.data, out=args.out, metric=args.metric,
            batch_size=args.batch_size, image_size=args.image_size,
            reference_stats=args.reference_stats, save_stats=args.save_stats,
            device=args.device, backend=args.backend, plots=not args.no_plots,
            workers=args.workers, mean=args.mean, std=args.std, figure_format=args.format)
    return 0


def _cmd_rank(args) -> int:
    from ..pipelines.rank import candidates_from_paths, rank, read_manifest

    if bool(args.manifest) == bool(args.models):
        raise TransferFastError("give candidate models either as paths or as --manifest")
    candidates = (read_manifest(args.manifest, args.arch) if args.manifest
                  else candidates_from_paths(args.models, args.arch))
    _allow_user_code([c.arch for c in candidates], args.allow_code)
    check_writable(args.out, folder=True)
    result = rank(candidates, args.data, out=args.out, batch_size=args.batch_size,
                  image_size=args.image_size, device=args.device, backend=args.backend,
                  plots=not args.no_plots, progress=not args.no_progress)
    for r in result.records:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.scores.items())
        print(f"{r.label}: {shown}" if r.status == "ok" else f"{r.label}: failed: {r.error}")
    print(f"{len(result.records) - result.failed} scored, {result.failed} failed; "
          f"table in {result.table}")
    return 1 if result.failed else 0


def _cmd_experiment(args) -> int:
    from ..pipelines.experiment import run_experiment

    if args.allow_code:
        _import_from_cwd()
    check_writable(args.out, folder=True)
    return _report_outcome(run_experiment(args.config, args.out, html=args.html,
                                          progress=not args.no_progress,
                                          allow_code=args.allow_code,
                                          allow_large=args.allow_large))


def _report_outcome(result) -> int:
    done = sum(r.status == "done" for r in result.runs)
    print(f"{done} of {len(result.runs)} runs measured; report in {result.report}")
    return 0 if done == len(result.runs) else 1


def _cmd_info(args) -> int:
    import torch

    from .. import __version__, ops
    from ..ops import _library as _ext

    build = _ext.build_info()
    print(f"transfer_fast {__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
          f"GPU {'present' if torch.cuda.is_available() else 'absent'})")
    print(f"compiled      {'loaded' if _ext.loaded else 'not loaded: ' + _ext.reason}")
    if _ext.loaded:
        ok, why = _ext.exceptions_work()
        print(f"exceptions    {'ok' if ok else 'BROKEN'}: {why}")
    if build:
        print(f"built with    torch {build['torch']}, CPU vectors {build['cpu_isa']}, CUDA "
              f"{'archs ' + str(build['cuda_archs']) if build['cuda'] else 'no'} "
              f"({build['cuda_reason']})")
    for name, state in ops.backend_status().items():
        print(f"backend {name:<6}{state}")
    return 0


def _cmd_demo(args) -> int:
    if args.print_config:
        from ..pipelines.experiment_config import DEMO_CONFIG

        print(DEMO_CONFIG, end="")
        return 0
    from ..pipelines.demo import run_demo

    check_writable(args.out, folder=True)
    return _report_outcome(run_demo(args.out, epochs=args.epochs, html=args.html,
                                    progress=not args.no_progress))
