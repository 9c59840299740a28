"""`transfer-fast` / `python -m transfer_fast`: measure, info, demo."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback

from .errors import TransferFastError


def _cmd_measure(args) -> int:
    from .measure.transferability import transferability
    from .report.figures import save_figure, transferability_figure
    from .report.tables import format_table, write_result_csv, write_result_json

    result = transferability(args.random, args.pretrained, args.finetuned, preset=args.preset,
                             metric=args.metric, backend=args.backend)
    print(format_table(result))
    for path, write in ((args.json, write_result_json), (args.csv, write_result_csv),
                        (args.plot, lambda r, p: save_figure(transferability_figure(r), p))):
        if path:
            write(result, path)  # a failed write raises TransferFastError naming the path
            print(f"wrote {path}")
    return 0


def _cmd_scan(args) -> int:
    from .pipelines.scan import scan

    if bool(args.manifest) == bool(args.finetuned):
        raise TransferFastError("give fine-tuned checkpoints either as paths or as --manifest")
    result = scan(args.finetuned, random=args.random, pretrained=args.pretrained,
                  manifest=args.manifest, out=args.out, preset=args.preset, metric=args.metric,
                  backend=args.backend, max_memory=args.max_memory, pairwise=args.pairwise,
                  plots=not args.no_plots, progress=not args.no_progress)
    if result.rank == 0:
        print(f"{result.done} measured, {result.failed} failed, {result.skipped} already "
              f"done; tables and plots in {result.out}/")
    return 0


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
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for arch in code:
        print(f"importing user architecture {arch} (--allow-code)")


def _cmd_gap(args) -> int:
    from .pipelines.gap_run import run_gap

    _allow_user_code([args.arch], args.allow_code)
    run_gap(args.model, args.arch, args.data, out=args.out, metric=args.metric,
            batch_size=args.batch_size, image_size=args.image_size,
            reference_stats=args.reference_stats, save_stats=args.save_stats,
            device=args.device, backend=args.backend, plots=not args.no_plots)
    return 0


def _cmd_rank(args) -> int:
    from .pipelines.rank import candidates_from_paths, rank, read_manifest

    if bool(args.manifest) == bool(args.models):
        raise TransferFastError("give candidate models either as paths or as --manifest")
    candidates = (read_manifest(args.manifest, args.arch) if args.manifest
                  else candidates_from_paths(args.models, args.arch))
    _allow_user_code([c.arch for c in candidates], args.allow_code)
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
    from .pipelines.experiment import run_experiment

    return _report_outcome(run_experiment(args.config, args.out, html=args.html,
                                          progress=not args.no_progress,
                                          allow_code=args.allow_code,
                                          allow_large=args.allow_large))


def _report_outcome(result) -> int:
    print(f"{sum(r['status'] == 'done' for r in result.runs)} of {len(result.runs)} runs "
          f"measured; report in {result.report}")
    return 0


def _bytes(text: str) -> int:
    """'512M', '2G', '1.5GB' or a plain byte count."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[:-1] if unit else t) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def _cmd_info(args) -> int:
    import torch

    from . import __version__, ops
    from .ops import _library as _ext

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
        from .pipelines.experiment_config import DEMO_CONFIG

        print(DEMO_CONFIG, end="")
        return 0
    from .pipelines.demo import run_demo

    return _report_outcome(run_demo(args.out, epochs=args.epochs, html=args.html,
                                    progress=not args.no_progress))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from .measure.plan import PRESETS
    from .measure.transferability import METRICS
    from .ops.dispatch import BACKENDS

    parser = argparse.ArgumentParser(
        prog="transfer-fast",
        description="Layer-wise transferability T = D(random, finetuned) / "
                    "D(pretrained, finetuned) of pre-trained networks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # Also accepted after the subcommand; SUPPRESS keeps it from resetting the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", parents=[common],
                       help="T per layer group for one fine-tuned checkpoint")
    m.add_argument("-r", "--random", required=True, help="random init θr (.pt/.pth/.safetensors)")
    m.add_argument("-a", "--pretrained", required=True, help="pre-trained θA")
    m.add_argument("-b", "--finetuned", required=True, help="fine-tuned θB")
    m.add_argument("--preset", default="auto", choices=PRESETS,
                   help="tensor selection and grouping; 'paper' = the authors' script")
    m.add_argument("--metric", default="l1_mean", choices=tuple(METRICS))
    m.add_argument("--backend", default="auto", choices=BACKENDS)
    m.add_argument("--json", help="write the result as JSON")
    m.add_argument("--csv", help="write the per-group table as CSV")
    m.add_argument("--plot", help="write a PNG of T per group")
    m.set_defaults(func=_cmd_measure)

    sc = sub.add_parser("scan", parents=[common],
                        help="T of many fine-tuned checkpoints into a resumable run folder")
    sc.add_argument("finetuned", nargs="*", help="fine-tuned checkpoints (or --manifest)")
    sc.add_argument("--random", help="random init θr (or a 'random' manifest column)")
    sc.add_argument("--pretrained", help="pre-trained θA (or a 'pretrained' manifest column)")
    sc.add_argument("--manifest", help="CSV with a 'path' column and any user columns")
    sc.add_argument("--out", required=True, help="run folder; rerunning it resumes")
    sc.add_argument("--preset", default="auto", choices=PRESETS)
    sc.add_argument("--metric", default="l1_mean", choices=tuple(METRICS))
    sc.add_argument("--backend", default="auto", choices=BACKENDS)
    sc.add_argument("--max-memory", type=_bytes, default=None,
                    help="bytes of fine-tuned tensors in flight, e.g. 512M (sets the batch "
                         "size K; default a quarter of free RAM or half of free GPU memory)")
    sc.add_argument("--pairwise", action="store_true",
                    help="also the cosine/L2 matrix of the fine-tuning updates")
    sc.add_argument("--no-plots", action="store_true", help="tables only, no PNGs")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.set_defaults(func=_cmd_scan)

    g = sub.add_parser("gap", parents=[common],
                       help="domain gap G, intraclass variance D and data amount N of a data "
                            "set under a pre-trained model")
    g.add_argument("--model", required=True, help="pre-trained checkpoint (.pt/.safetensors)")
    g.add_argument("--arch", required=True,
                   help="resnet18/34/50, tiny-resnet, or package.module:function")
    g.add_argument("--data", required=True,
                   help="folder of images in class subfolders, or .npz with x and y")
    g.add_argument("--out", default="runs/gap", help="output folder (default runs/gap)")
    g.add_argument("--metric", default="w2", choices=("w2", "skl"),
                   help="BN-statistics gap: 2-Wasserstein or symmetric KL")
    g.add_argument("--batch-size", type=_positive_int, default=64)
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize images (default 224 for folders, as stored for .npz)")
    g.add_argument("--reference-stats",
                   help="FeatureStats .safetensors of the pre-training data (from --save-stats)"
                        ": adds the Fréchet distance of the penultimate features")
    g.add_argument("--save-stats", help="save this data's FeatureStats to a .safetensors file")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--backend", default="auto", choices=BACKENDS)
    g.add_argument("--no-plots", action="store_true", help="tables only, no PNG")
    g.add_argument("--allow-code", action="store_true",
                   help="allow --arch package.module:function to import your code")
    g.set_defaults(func=_cmd_gap)

    rk = sub.add_parser("rank", parents=[common],
                        help="transferability scores (LogME, H-score, TransRate, NCE, LEEP) of "
                             "candidate models on one data set, before fine-tuning")
    rk.add_argument("models", nargs="*", help="candidate checkpoints (or --manifest)")
    rk.add_argument("--manifest", help="CSV with a 'path' column, optional 'arch' and 'label' "
                                       "columns and any columns of your own")
    rk.add_argument("--arch", help="architecture of every model: resnet18/34/50, tiny-resnet, "
                                   "or package.module:function (needs --allow-code)")
    rk.add_argument("--allow-code", action="store_true",
                    help="allow --arch package.module:function to import your code")
    rk.add_argument("--data", required=True,
                    help="folder of images in class subfolders, or .npz with x and y")
    rk.add_argument("--out", required=True, help="run folder; rerunning it resumes")
    rk.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    rk.add_argument("--image-size", type=_positive_int, default=None,
                    help="resize images (default 224 for folders, as stored for .npz)")
    rk.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU "
                                                   "when present)")
    rk.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto")
    rk.add_argument("--no-plots", action="store_true", help="table only, no scores.png")
    rk.add_argument("--no-progress", action="store_true", help="no progress bars")
    rk.set_defaults(func=_cmd_rank)

    x = sub.add_parser("experiment", parents=[common],
                       help="pre-train, fine-tune a grid of tasks x data amounts x seeds, "
                            "measure T, G, D, N, fit the model, write report.md")
    x.add_argument("config", help="TOML config (see `transfer-fast demo --print-config`)")
    x.add_argument("--out", default=None,
                   help="run folder (default runs/<experiment.name>); rerunning resumes")
    x.add_argument("--html", action="store_true", help="also one self-contained report.html")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    x.add_argument("--allow-code", action="store_true",
                   help="allow model.arch = 'package.module:function' to import your code")
    x.add_argument("--allow-large", action="store_true",
                   help="allow a grid beyond the documented limits of runs and memory")
    x.set_defaults(func=_cmd_experiment)

    i = sub.add_parser("info", parents=[common],
                       help="versions, available backends, built architectures")
    i.set_defaults(func=_cmd_info)

    d = sub.add_parser("demo", parents=[common],
                       help="the paper's study in miniature on scikit-learn's digits: "
                            "pre-train, fine-tune 40 runs, report.md with figures")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs of both training stages (default: the config's 30 and 20)")
    d.add_argument("--html", action="store_true", help="also one self-contained report.html")
    d.add_argument("--print-config", action="store_true",
                   help="print the demo's TOML config (a start for `experiment`) and exit")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 some scan rows failed, 2 bad input or an OS error (one line,
    naming the file, tensor or value), 3 a bug (traceback), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TransferFastError, OSError) as exc:
        if args.debug:
            raise
        print(f"transfer-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transfer-fast: interrupted", file=sys.stderr)
        return 130
    except Exception:  # not the user's mistake: show everything
        traceback.print_exc()
        print("transfer-fast: this is a bug, please report it with the traceback above "
              "(`transfer-fast info` shows the versions)", file=sys.stderr)
        return 3


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or text}"
    return text.splitlines()[0] if text else type(exc).__name__
