"""`demo` command: readable figures of a few random images and an index.html to browse them.

For `--num_samples` images chosen at random (seeded by `--seed`), one figure `<stem>.png` shows the image,
the ground truth, the prediction and the errors (missed, false positive, split, merged nuclei, drawn as
coloured outlines on the image at twice its size, so they stay readable on tiles with hundreds of nuclei),
with the image's PQ, AJI and Dice in the titles. With a cross-validation model set each image is predicted by the
fold model that did not train on it (the same pairing as `evaluate`). `index.html` in the output folder
shows every figure with its tissue and scores; `demo.json` records the settings and versions.
"""
from __future__ import annotations

import argparse
import html
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import evaluate
import metrics
import postprocess
import utils
import visualize
from utils import UserError

log = logging.getLogger(__name__)


ERROR_ZOOM = 2          # the error panel is drawn at twice the image's size: outlines thinner than nuclei
PANEL_INCHES = 4.0      # figure_panels' default panel width


def figure_dpi(width: int) -> int:
    """At least one figure pixel per error-panel pixel, so 1-pixel outlines survive (100 dpi at <= 200 px)."""
    return int(max(100, min(300, -(-width * ERROR_ZOOM // PANEL_INCHES))))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    evaluate.add_model_arguments(parser)
    parser.add_argument("--output_dir", default="demo", help="folder for the figures and index.html")
    parser.add_argument("--num_samples", type=int, default=10, help="number of random images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of images")
    evaluate.add_postprocess_arguments(parser)


def choose_images(assignments: Sequence[tuple[Any, int | None, Sequence[Any]]], num_samples: int,
                  seed: int) -> list[tuple[Any, int | None, Any]]:
    """`num_samples` random (member, fold, sample) triples (all when fewer), sorted by image path."""
    pool = [(member, fold, s) for member, fold, group in assignments for s in group]
    pool.sort(key=lambda t: t[2].rel_path)
    rng = np.random.default_rng(seed)
    k = min(num_samples, len(pool))
    chosen = sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []
    return [pool[i] for i in chosen]


def _score_text(scores: Mapping[str, Any]) -> str:
    return f"PQ {scores['pq']:.3f} · AJI {scores['aji']:.3f} · Dice {scores['dice']:.3f}"


def render_index(entries: Sequence[Mapping[str, Any]], title: str, meta: Mapping[str, str]) -> str:
    """index.html: every figure with its tissue, image path, fold and scores (text escaped, links relative)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1600px}"
        "figure{margin:0 0 2em 0;border-bottom:1px solid #ccc;padding-bottom:1em}"
        "img{max-width:100%;height:auto}figcaption{font-size:0.95em;margin-top:0.3em}"
        "table{border-collapse:collapse}td,th{padding:0.2em 0.6em;text-align:left}"
        "dt{font-weight:bold;float:left;clear:left;width:9em}dd{margin-left:10em}</style>",
        "</head>", "<body>", f"<h1>{esc(title)}</h1>", "<dl>",
    ]
    parts += [f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in meta.items()]
    parts.append("</dl>")
    parts.append("<table><tr><th>image</th><th>tissue</th><th>fold</th><th>PQ</th><th>AJI</th><th>Dice</th>"
                  "<th>true</th><th>predicted</th></tr>")
    for e in entries:
        anchor = esc(e["stem"], quote=True)
        parts.append(f'<tr><td><a href="#{anchor}">{esc(e["image"])}</a></td><td>{esc(e["tissue"])}</td>'
                     f'<td>{esc(str(e["fold"]))}</td><td>{e["pq"]:.3f}</td><td>{e["aji"]:.3f}</td>'
                     f'<td>{e["dice"]:.3f}</td><td>{e["num_true"]}</td><td>{e["num_pred"]}</td></tr>')
    parts.append("</table>")
    for e in entries:
        src = urllib.parse.quote(e["figure"])
        caption = (f"<b>{esc(e['tissue'])}</b> — {esc(e['image'])}"
                   + (f" — fold {esc(str(e['fold']))}" if e["fold"] not in ("", None) else "")
                   + f"<br>{esc(_score_text(e))} · {e['num_true']} true, {e['num_pred']} predicted nuclei")
        parts.append(f'<figure id="{esc(e["stem"], quote=True)}"><a href="{esc(src, quote=True)}">'
                     f'<img src="{esc(src, quote=True)}" alt="{esc(e["image"], quote=True)}" loading="lazy"></a>'
                     f"<figcaption>{caption}</figcaption></figure>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    import dataset
    import nuclei_model

    if args.num_samples < 1:
        raise UserError(f"--num_samples {args.num_samples}: must be at least 1")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be 0 or more")
    start = time.perf_counter()
    model_set, samples, data_dir, device = evaluate.load_for_evaluation(args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    fold = None
    if not model_set.is_cv:  # a single fold's model: show only its own test images when they are known
        member = model_set.members[0]
        test = evaluate.member_test_images(member, model_set, args.model_path)
        if test and member.fold is not None and any(s.rel_path in set(test) for s in samples):
            fold = member.fold
            log.info("single model of fold %d: choosing among the images of its test fold", fold)
    cross = evaluate.is_cross_dataset(model_set, samples, fold, args.model_path)
    if cross:  # data the CV model was not trained on: one model (or the ensemble) for every image
        assignments, scored_by = evaluate.cross_dataset_assignments(model_set, samples, args.ensemble)
    else:
        assignments = evaluate.assign_samples(model_set, samples, fold=fold, model_path=args.model_path,
                                              data_dir=data_dir)
    chosen = choose_images(assignments, args.num_samples, args.seed)
    if not chosen:
        raise UserError(f"--data_dir {data_dir}: no image to show with this model")
    utils.make_output_dir(output_dir)  # every check passed: a folder that cannot be made fails before the work
    overrides = evaluate.postprocess_overrides(args)
    stems = evaluate.output_stems([s for _, _, s in chosen])
    from tqdm import tqdm

    nets: dict[int, Any] = {}
    entries = []
    for member, fold, sample in tqdm(chosen, desc="demo", unit="img", disable=getattr(args, "quiet", False)):
        image, labels, vague = dataset.load_sample(sample)
        if id(member) not in nets:   # LoRA merged, Conv+BN folded: same outputs, faster
            nets[id(member)] = [nuclei_model.prepare_for_inference(m) for m in evaluate.member_models(member)]
        # whole image through the network, or through the inference engine's tiling when it is not one training tile
        (fg, hv), = evaluate.segment_maps(model_set, nets[id(member)], [image], device, mpp=args.data_mpp)
        settings = evaluate.member_postprocess(model_set, member, overrides)
        pred = postprocess.postprocess(fg, hv, postprocess.PostprocessConfig.from_dict(settings))
        pred = evaluate.labels_to_image(pred, labels.shape)
        ignore = vague if args.ignore_vague else None
        scores = metrics.instance_metrics(labels, pred, ignore=ignore)
        shown_true, shown_pred = labels, pred
        if ignore is not None and ignore.any():   # draw only the nuclei that were scored
            shown_true = metrics.apply_ignore_region(labels, ignore)
            shown_pred = metrics.apply_ignore_region(pred, ignore)
        errors, counts = visualize.error_contours(image, shown_true, shown_pred, zoom_factor=ERROR_ZOOM)
        legend = visualize.error_contour_legend(counts)
        if ignore is not None and ignore.any():
            errors[visualize.boundaries(visualize.zoom(ignore.astype(np.int32), ERROR_ZOOM))] = evaluate.VAGUE_COLOR
            legend.append(("ambiguous region (ignored)", evaluate.VAGUE_COLOR))
        stem = stems[sample.rel_path]
        figure = f"{stem}.png"
        fold_text = f", fold {fold}" if fold is not None else ""
        visualize.figure_panels(
            [(f"{sample.tissue}: {sample.name}", image),
             (f"ground truth ({scores['num_true']} nuclei)", visualize.overlay_instances(image, labels)),
             (f"prediction ({scores['num_pred']} nuclei)", visualize.overlay_instances(image, pred)),
             (f"errors: {_score_text(scores)}", errors)],
            output_dir / figure, suptitle=f"{sample.rel_path}{fold_text} — {_score_text(scores)}", legend=legend,
            dpi=figure_dpi(image.shape[1]))
        entries.append({"image": sample.rel_path, "tissue": sample.tissue, "fold": "" if fold is None else fold,
                        "stem": stem, "figure": figure,
                        **{k: scores[k] for k in ("pq", "aji", "dice", "sq", "rq", "num_true", "num_pred")},
                        "errors": counts, "postprocess": settings})
    meta = {"model": str(args.model_path), "data": str(data_dir), "images shown": str(len(entries)),
            "seed": str(args.seed),
            "pairing": (f"cross-dataset: {scored_by}" if cross else
                        "each image predicted by the fold model that did not train on it" if model_set.is_cv
                        else "single model"),
            "ambiguous regions": "ignored" if args.ignore_vague else "scored"}
    utils.atomic_write_text(output_dir / "index.html", render_index(entries, "Nuclei segmentation demo", meta))
    utils.write_json(output_dir / "demo.json", {
        "images": entries, "model_path": str(args.model_path), "data_dir": str(data_dir), "seed": args.seed,
        "num_samples": args.num_samples, "ignore_vague": bool(args.ignore_vague), "postprocess_overrides": overrides,
        "model_config": model_set.config, "seconds": round(time.perf_counter() - start, 1),
        "environment": utils.environment_info()})
    print(f"{len(entries)} figures and index.html in {output_dir} (open {output_dir / 'index.html'})")
    return 0
