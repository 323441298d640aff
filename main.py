"""Command-line entry point: `python main.py <command> [options]`.

A thin layer over the library modules. Each command module provides
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together, sets up logging and
CPU threads, and turns a `UserError` into one readable line and a non-zero exit status.

Exit status (the same for every command): 0 = everything done; 2 = a usage, option or input error found
before any work (argparse's own errors too); 1 = a batch command finished but one or more inputs failed
(each reported on one line); 130 = interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

import utils
from utils import UserError

# command name -> (module, one-line help)
COMMANDS = {
    "download": ("download_weights", "download the official MobileSAM weights (mobile_sam.pt)"),
    "make_sample_data": ("sample_data", "write a synthetic H&E dataset in the NuInsSeg layout"),
    "train": ("train", "fine-tune MobileSAM with LoRA (optionally K-fold cross-validation)"),
    "evaluate": ("evaluate", "score a trained model: Dice/IoU/AJI/PQ/SQ/RQ per image and tissue"),
    "parameter_search": ("parameter_search", "grid or TPE search over LoRA rank/alpha/learning rate"),
    "demo": ("demo", "figures of random images: image | ground truth | prediction | errors"),
    "predict": ("predict", "segment new images of any size (tiled), write TIFF/GeoJSON/CSV/overlay"),
    "import_annotations": ("annotations", "ImageScope XML / QuPath GeoJSON polygons -> a folders-layout dataset"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: ...)` to an option's help, unless the help already says what the default is
    (otherwise `--tile_size` would read "(default: the model's training tile, 512) (default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An option error is one line, `error: <option>: <problem> (see python main.py <command> --help)`,
    exit status 2, instead of the whole usage text. A value that starts with a minus and a digit (`-1,0`,
    `-1e-3`) is a value, never an option, so the command's own check can say what is wrong with it (argparse
    itself only takes plain negative numbers such as `-1` as values)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse's test for "looks like a negative number" (no option of this CLI starts with a digit)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {one_line_message(message)} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def one_line_message(message: str) -> str:
    """argparse's message in the project's `<option>: <problem>` form."""
    if message.startswith("argument "):
        option, _, problem = message[len("argument "):].partition(": ")
        return f"{option.split('/')[-1] if option.startswith('-') else option}: {problem}"
    for prefix, problem in (("the following arguments are required: ", "required"),
                            ("unrecognized arguments: ", "unknown option")):
        if message.startswith(prefix):
            return f"{message[len(prefix):]}: {problem}"
    return message


def _add_quiet(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="main.py",
        description="Nuclei instance segmentation in H&E histology with MobileSAM + LoRA.",
        epilog="Run `python main.py <command> --help` for the options of a command. Exit status: 0 done, "
               "2 usage/option/input error (nothing done), 1 some inputs of a batch failed, 130 interrupted.",
    )
    _add_quiet(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip()
        p = sub.add_parser(name, help=help_text, description=doc,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        if not any("--threads" in a.option_strings for a in p._actions):
            utils.add_threads_argument(p)
        _add_quiet(p, argparse.SUPPRESS)  # -q also after the command name, without resetting a -q before it
        p.set_defaults(_module=module)
    parser.command_parsers = dict(sub.choices)  # for errors about a command's options
    return parser


def preset_environment(argv: list[str]) -> None:
    """Before any command module (and so torch and its OpenMP runtime) is imported: the OpenMP wait
    policy and a first thread count (`--threads`, else OMP_NUM_THREADS, else the usable cores), which the
    runtime reads only once, when it loads. A bad `--threads` value is left for the full parser to report."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--threads", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        threads = None if known.threads is None else int(known.threads)
        utils.preset_threads(threads if threads is None or threads >= 1 else None)
    except (ValueError, UserError):
        utils.set_openmp_wait_policy()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    preset_environment(argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help (0) or an option error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    mode = utils.configure_progress(args.quiet)  # -q: no bars; stderr not a terminal: plain progress lines
    try:
        utils.configure_threads(args.threads)  # commands that start worker processes refine the share
        if mode == "bars":  # log lines printed above the bars instead of onto a bar's line
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                return int(args._module.run(args) or 0)
        return int(args._module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        # e.g. an output folder whose parent is a file, a full disk, no permission
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
