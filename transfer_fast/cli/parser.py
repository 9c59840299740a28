"""The `transfer-fast` argument parser: every subcommand, its options and help, the
short options that mean the same everywhere, and the exit statuses (`--help` lists both)."""

from __future__ import annotations

import argparse

from .commands import (
    _cmd_demo,
    _cmd_experiment,
    _cmd_gap,
    _cmd_info,
    _cmd_measure,
    _cmd_rank,
    _cmd_scan,
)

# One meaning per short option, in every subcommand that has the long one.
SHORT_OPTIONS = {"-r": "--random", "-a": "--pretrained", "-b": "--finetuned",
                 "-p": "--preset", "-m": "--metric", "-o": "--out", "-d": "--data",
                 "-f": "--format", "-w": "--workers", "-V": "--version"}
EXIT_STATUS = {0: "done, every checkpoint, model or run measured",
               1: "done, but some rows failed (listed in the outputs)",
               2: "bad input, an unusable output path or an OS error (one line naming it)",
               3: "a bug (a traceback: please report it)", 130: "interrupted"}


def _epilog() -> str:
    items = [f"{k} {v:<13}" for k, v in SHORT_OPTIONS.items()]
    shorts = "\n".join("  " + "".join(items[i:i + 4]).rstrip() for i in range(0, len(items), 4))
    codes = "\n".join(f"  {k:<4}{v}" for k, v in EXIT_STATUS.items())
    return (f"short options, the same in every command that has them:\n{shorts}\n\n"
            f"exit status:\n{codes}\n\n"
            "--debug (before or after the command) shows the traceback of an error.")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless its help already says it, or it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.required
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _floats(text: str) -> tuple[float, ...]:
    """'0.5' or '0.485,0.456,0.406': one value for every channel, or one per channel."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got "
                                         f"{text!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..io.datasets import MEAN, STD
    from ..measure.plan import PRESETS
    from ..measure.transferability import METRICS
    from ..ops.dispatch import BACKENDS
    from ..report.figures import FORMATS

    parser = argparse.ArgumentParser(
        prog="transfer-fast", formatter_class=_HelpFormatter, epilog=_epilog(),
        description="Layer-wise transferability T = D(random, finetuned) / "
                    "D(pretrained, finetuned) of pre-trained networks.")
    parser.add_argument("-V", "--version", action="version",
                        version=f"transfer-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # Also accepted after the subcommand; SUPPRESS keeps it from resetting the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help,
                              formatter_class=_HelpFormatter, epilog=_epilog())

    def measure_options(p, what: str) -> None:
        p.add_argument("-p", "--preset", default="auto", choices=PRESETS,
                       help="tensor selection and grouping; 'paper' = the authors' script, "
                            "'auto' picks one from the names")
        p.add_argument("-m", "--metric", default="l1_mean", choices=tuple(METRICS),
                       help=f"distance between parameter sets {what}")
        p.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="kernels: 'auto' the fastest for the tensors' device")

    def selection_options(p) -> None:
        p.add_argument("--groups", metavar="FILE",
                       help="your own grouping: a TOML or JSON file of ordered {name, pattern} "
                            "entries (regular expressions on tensor names; first match wins) "
                            "(default: the preset's)")
        p.add_argument("--classifier", metavar="NAME",
                       help="the group or module that is the classifier head, left out of "
                            "the overall (default: found from names and shapes)")
        p.add_argument("--key", metavar="KEY",
                       help="the entry of a wrapped checkpoint that holds the state, e.g. "
                            "state_dict_ema (default: the parameters' usual wrappers)")
        p.add_argument("--strict", action="store_true",
                       help="tensors present only in the fine-tuned set are an error "
                            "(default: left out and listed)")

    def figure_format(p) -> None:
        p.add_argument("-f", "--format", default="png", choices=FORMATS,
                       help="file format of the figures")

    m = command("measure", "T per layer group for one fine-tuned checkpoint")
    m.add_argument("-r", "--random", required=True, help="random init θr (.pt/.pth/.safetensors)")
    m.add_argument("-a", "--pretrained", required=True, help="pre-trained θA")
    m.add_argument("-b", "--finetuned", required=True, help="fine-tuned θB")
    measure_options(m, "(per tensor, averaged per group)")
    selection_options(m)
    m.add_argument("--json", metavar="FILE",
                   help="write the result as JSON ('-': stdout; the table goes to stderr) "
                        "(default: not written)")
    m.add_argument("--csv", metavar="FILE",
                   help="write the per-group table as CSV ('-': stdout; the table goes to "
                        "stderr) (default: not written)")
    m.add_argument("--plot", metavar="FILE",
                   help="write a figure of T per group, in the format of the suffix "
                        "(.png, .pdf, .svg) (default: not written)")
    m.set_defaults(func=_cmd_measure)

    sc = command("scan", "T of many fine-tuned checkpoints into a resumable run folder")
    sc.add_argument("finetuned", nargs="*", help="fine-tuned checkpoints: files, Hugging Face "
                                                 "model folders or *.index.json (or --manifest)")
    sc.add_argument("-r", "--random", help="random init θr (default: a 'random' manifest "
                                           "column)")
    sc.add_argument("-a", "--pretrained", help="pre-trained θA (default: a 'pretrained' "
                                               "manifest column)")
    sc.add_argument("--manifest", metavar="CSV",
                    help="CSV with a 'path' column, optional 'random', 'pretrained', 'label' "
                         "or 'run' (names in the figures) columns and any columns of your own "
                         "(default: the checkpoints given as arguments)")
    sc.add_argument("-o", "--out", required=True, help="run folder; rerunning it resumes")
    measure_options(sc, "(per tensor, averaged per group)")
    selection_options(sc)
    sc.add_argument("--max-memory", type=_bytes, default=None, metavar="SIZE",
                    help="bytes of fine-tuned checkpoints in flight, e.g. 512M: two host "
                         "buffers of K checkpoints (a GPU holds half as much again); sets K "
                         "and splits a model too large into parts (default: the smallest of "
                         "a quarter of free RAM, 1 GiB and half the free GPU memory)")
    sc.add_argument("--pairwise", action="store_true",
                    help="also the cosine/L2 matrix of the fine-tuning updates")
    figure_format(sc)
    sc.add_argument("--no-plots", action="store_true", help="tables only, no figures")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.set_defaults(func=_cmd_scan)

    g = command("gap", "domain gap G, intraclass variance D and data amount N of a data set "
                       "under a pre-trained model")
    g.add_argument("--model", required=True, help="pre-trained checkpoint (.pt/.safetensors)")
    g.add_argument("--arch", required=True,
                   help="resnet18/34/50, tiny-resnet, or package.module:function (with "
                        "--allow-code)")
    g.add_argument("-d", "--data", required=True,
                   help="folder of images in class subfolders (streamed), or .npz with x and y")
    g.add_argument("-o", "--out", default="runs/gap", help="output folder")
    g.add_argument("-m", "--metric", default="w2", choices=("w2", "skl"),
                   help="BN-statistics gap: 2-Wasserstein or symmetric KL")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize images to this square side (default 224 for folders, as "
                        "stored for .npz)")
    g.add_argument("--mean", type=_floats, default=(MEAN,), metavar="M[,M,M]",
                   help="normalisation mean of pixels in [0, 1]: one value, or one per "
                        f"channel (default: {MEAN}, the paper's)")
    g.add_argument("--std", type=_floats, default=(STD,), metavar="S[,S,S]",
                   help=f"normalisation std: one value, or one per channel (default: {STD}, "
                        "the paper's)")
    g.add_argument("-w", "--workers", type=_count, default=None,
                   help="DataLoader processes decoding an image folder; 0 decodes in this "
                        "process (default: the usable CPUs less one, at most 8)")
    g.add_argument("--reference-stats", metavar="FILE",
                   help="FeatureStats .safetensors of the pre-training data (from --save-stats)"
                        ": adds the Fréchet distance of the penultimate features (default: "
                        "none)")
    g.add_argument("--save-stats", metavar="FILE",
                   help="save this data's FeatureStats to a .safetensors file (default: not "
                        "saved)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU when "
                                                  "present)")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="kernels of the statistics")
    figure_format(g)
    g.add_argument("--no-plots", action="store_true", help="tables only, no figure")
    g.add_argument("--allow-code", action="store_true",
                   help="allow --arch package.module:function to import your code (from "
                        "the working folder too)")
    g.set_defaults(func=_cmd_gap)

    rk = command("rank", "transferability scores (LogME, H-score, TransRate, NCE, LEEP) of "
                         "candidate models on one data set, before fine-tuning")
    rk.add_argument("models", nargs="*", help="candidate checkpoints (or --manifest)")
    rk.add_argument("--manifest", metavar="CSV",
                    help="CSV with a 'path' column, optional 'arch' and 'label' columns and "
                         "any columns of your own (default: the models given as arguments)")
    rk.add_argument("--arch", help="architecture of every model: resnet18/34/50, tiny-resnet, "
                                   "or package.module:function (needs --allow-code; default: "
                                   "an 'arch' manifest column)")
    rk.add_argument("--allow-code", action="store_true",
                    help="allow --arch package.module:function to import your code (from "
                         "the working folder too)")
    rk.add_argument("-d", "--data", required=True,
                    help="folder of images in class subfolders, or .npz with x and y")
    rk.add_argument("-o", "--out", required=True, help="run folder; rerunning it resumes")
    rk.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch")
    rk.add_argument("--image-size", type=_positive_int, default=None,
                    help="resize images (default 224 for folders, as stored for .npz)")
    rk.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU "
                                                   "when present)")
    rk.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="kernels of the statistics")
    rk.add_argument("--no-plots", action="store_true", help="table only, no scores.png")
    rk.add_argument("--no-progress", action="store_true", help="no progress bars")
    rk.set_defaults(func=_cmd_rank)

    x = command("experiment", "pre-train, fine-tune a grid of tasks x data amounts x seeds, "
                              "measure T, G, D, N, fit the model, write report.md")
    x.add_argument("config", help="TOML config (see `transfer-fast demo --print-config`)")
    x.add_argument("-o", "--out", default=None,
                   help="run folder (default runs/<experiment.name>); rerunning resumes")
    x.add_argument("--html", action="store_true", help="also one self-contained report.html")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    x.add_argument("--allow-code", action="store_true",
                   help="allow model.arch = 'package.module:function' to import your code "
                        "(from the working folder too)")
    x.add_argument("--allow-large", action="store_true",
                   help="allow a grid beyond the documented limits of runs and memory")
    x.set_defaults(func=_cmd_experiment)

    i = command("info", "versions, available backends, built architectures")
    i.set_defaults(func=_cmd_info)

    d = command("demo", "the paper's study in miniature on scikit-learn's digits: pre-train, "
                        "fine-tune 40 runs, report.md with figures (needs scikit-learn)")
    d.add_argument("-o", "--out", default="runs/demo", help="run folder")
    d.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs of both training stages (default: the config's 30 and 20)")
    d.add_argument("--html", action="store_true", help="also one self-contained report.html")
    d.add_argument("--print-config", action="store_true",
                   help="print the demo's TOML config (a start for `experiment`) and exit")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    return parser
