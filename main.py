"""Command-line entry point: `python main.py <command> [options]`.

A thin layer over the library modules. Each command module provides
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together, sets up logging and
turns a `UserError` into one readable line and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from utils import UserError

# command name -> (module, one-line help)
COMMANDS = {
    "download": ("download_weights", "download the official MobileSAM weights (mobile_sam.pt)"),
    "make_sample_data": ("sample_data", "write a synthetic H&E dataset in the NuInsSeg layout"),
    "train": ("train", "fine-tune MobileSAM with LoRA (optionally K-fold cross-validation)"),
    "evaluate": ("evaluate", "score a trained model: Dice/IoU/AJI/PQ/SQ/RQ per image and tissue"),
    "parameter_search": ("parameter_search", "grid or TPE search over LoRA rank/alpha/learning rate"),
    "demo": ("demo", "figures of random images: image | ground truth | prediction | overlay"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Nuclei instance segmentation in H&E histology with MobileSAM + LoRA.",
        epilog="Run `python main.py <command> --help` for the options of a command.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip()
        p = sub.add_parser(name, help=help_text, description=doc,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
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
