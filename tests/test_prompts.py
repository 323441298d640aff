"""Prompt mode of predict (prompts.py): golden masks from the reference weights, CSV parsing, windows,
merging into a label map, trained --head sam models, one-line errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

import main
import nuclei_model as nm
import prompts
import train
import utils
from utils import UserError


def _golden_mask(masks: np.ndarray, size: int) -> np.ndarray:
    """SAM's post-processing of one low-res logit map: bilinear to the frame (here = the image), threshold 0."""
    up = F.interpolate(torch.from_numpy(masks)[None, None].float(), size=(size, size), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    return up


@pytest.fixture(scope="module")
def golden(reference_dir: Path, tmp_path_factory) -> dict:
    data = dict(np.load(reference_dir / "mobile_sam_decoder_golden.npz"))
    folder = tmp_path_factory.mktemp("golden_prompt")
    image = np.load(reference_dir / "mobile_sam_encoder_golden.npz")["image"]
    data["image"] = image
    data["image_path"] = folder / "golden.png"
    Image.fromarray(image).save(data["image_path"])
    data["weights"] = folder / "mobile_sam.pt"
    shutil.copy(reference_dir / "mobile_sam_random_weights.pt", data["weights"])
    data["points_csv"] = folder / "points.csv"
    data["points_csv"].write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in data["points_xy"][:, 0]))
    data["boxes_csv"] = folder / "boxes.csv"
    data["boxes_csv"].write_text("".join(" ".join(str(v) for v in b) + "\n" for b in data["boxes_xyxy"]))
    return data


@pytest.fixture(scope="module")
def official_masks(golden, one_torch_thread) -> list:
    net = prompts.load_prompt_net(golden["weights"], torch.device("cpu"), tile_size=1024)
    assert net.official and net.frame == 1024
    items = prompts.load_prompts(str(golden["points_csv"]), str(golden["boxes_csv"]), golden["image"].shape[:2])
    return list(prompts.segment_prompts(net, golden["image"], items))


def _full(pm: prompts.PromptMask, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    y, x = pm.origin
    out[y:y + pm.mask.shape[0], x:x + pm.mask.shape[1]] = pm.mask
    return out


def test_point_prompts_give_the_golden_masks(golden, official_masks, report):
    worst = 0
    for i in range(3):
        j = int(np.argmax(golden["points_iou"][i]))  # SAM's choice among the 3 candidates
        logits = _golden_mask(golden["points_masks"][i, j], 1024)
        pm = official_masks[i]
        assert pm.prompt.kind == "point" and pm.window == (0, 0, 1024, 1024)
        assert pm.iou == pytest.approx(float(golden["points_iou"][i, j]), abs=1e-4)
        ours = _full(pm, (1024, 1024))
        differ = ours != (logits > 0)
        # the encoder and decoder agree with the official ones to ~1e-6: only pixels on the threshold may flip
        assert np.all(np.abs(logits[differ]) < 1e-3)
        worst = max(worst, int(differ.sum()))
        assert (logits > 0).sum() > 1000  # a real mask, not an empty comparison
    report(f"prompt mode vs golden point masks (1024 x 1024, threshold 0): at most {worst} differing pixels")


def test_box_prompts_give_the_golden_masks(golden, official_masks):
    for i in range(2):
        logits = _golden_mask(golden["boxes_masks"][i, 0], 1024)
        pm = official_masks[3 + i]
        assert pm.prompt.kind == "box"
        assert pm.iou == pytest.approx(float(golden["boxes_iou"][i, 0]), abs=1e-4)
        differ = _full(pm, (1024, 1024)) != (logits > 0)
        assert np.all(np.abs(logits[differ]) < 1e-3)


def test_cli_writes_instances_merged_into_labels(golden, official_masks, tmp_path, one_torch_thread):
    base = np.zeros((1024, 1024), dtype=np.uint16)
    base[:512, :512] = 7
    base[600:700, 600:700] = 9
    merge_path = tmp_path / "existing_labels.tif"
    tifffile.imwrite(merge_path, base)
    out = tmp_path / "merged"
    assert main.main(["-q", "predict", "--model_path", str(golden["weights"]), "--input", str(golden["image_path"]),
                      "--points", str(golden["points_csv"]), "--boxes", str(golden["boxes_csv"]),
                      "--tile_size", "1024", "--merge_into", str(merge_path), "--output_dir", str(out),
                      "--no_overlay", "--device", "cpu", "--threads", "1"]) == 0  # as the 1-thread reference
    merged = tifffile.imread(out / "golden_labels.tif")
    expected, assigned = prompts.compose(official_masks, base.shape, base)
    assert [i for _, i in assigned] == [10, 11, 12, 13, 14]  # new ids above the largest existing id
    assert merged.shape == (1024, 1024) and np.mean(merged != expected) < 1e-4
    union = np.zeros(base.shape, bool)
    for pm in official_masks:
        union |= _full(pm, base.shape)
    assert set(np.unique(merged[union])) <= set(range(10, 15))  # the prompts win where they cover the map
    assert np.array_equal(merged[~union], base[~union])
    rows = utils.read_csv(out / "golden_prompts.csv")
    assert [r["kind"] for r in rows] == ["point"] * 3 + ["box"] * 2 and [r["id"] for r in rows] == [
        "10", "11", "12", "13", "14"]
    for name in ("golden.geojson", "golden_nuclei.csv"):
        assert (out / name).is_file()
    assert tifffile.imread(merge_path).max() == 9  # the input label map is left as it was


def test_outside_coordinates_are_one_line(golden, tmp_path, capsys):
    bad = tmp_path / "bad_points.csv"
    bad.write_text("x,y\n10,10\n1030,5\n")
    code = main.main(["predict", "--model_path", str(golden["weights"]), "--input", str(golden["image_path"]),
                      "--points", str(bad), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bad_points.csv: line 3" in err and "(1030, 5) lies outside the image (1024 x 1024" in err
    assert not (tmp_path / "o").exists()


def test_prompt_mode_with_trained_sam_head(golden, synthetic_data_dir, tmp_path, one_torch_thread):
    # a --head sam checkpoint as train writes it (LoRA + decoder tensors, base weights by reference), with
    # changed trainable weights so that its decoder differs from the base file's
    out = tmp_path / "sam"
    config = {"pretrained": str(golden["weights"]), "head": "sam", "input_size": 64, "lora_rank": 4,
              "lora_alpha": 4.0, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "train_only_lora": True,
              "tile_size": 128}
    trained = nm.build_model(config)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    (out / "fold_0").mkdir(parents=True)
    nm.save_checkpoint(out / "fold_0" / "best_model.pth", trained, config, train.default_postprocess("sam"))
    shutil.copy(out / "fold_0" / "best_model.pth", out / "best_model.pth")
    image_path = next(synthetic_data_dir.glob("*/tissue images/*.png"))
    points = tmp_path / "p.csv"
    points.write_text("20,30\n100,64.5\n")
    boxes = tmp_path / "b.csv"
    boxes.write_text("10,10,40,40\n")
    res = tmp_path / "res"
    assert main.main(["-q", "predict", "--model_path", str(out / "best_model.pth"), "--input", str(image_path),
                      "--points", str(points), "--boxes", str(boxes), "--output_dir", str(res), "--no_overlay"]) == 0
    labels = tifffile.imread(res / f"{image_path.stem}_labels.tif")
    assert labels.shape == (128, 128)
    rows = utils.read_csv(res / f"{image_path.stem}_prompts.csv")
    assert [r["kind"] for r in rows] == ["point", "point", "box"]
    assert all(r["window_size"] == "128" for r in rows)  # the training tile (the synthetic image size)

    # the prompt path is the trained model's own encoder + head (two paths agree)
    net = prompts.load_prompt_net(out / "best_model.pth", torch.device("cpu"))
    assert not net.official and net.frame == 64 and net.window == 128
    model = nm.load_model(out / "fold_0" / "best_model.pth")
    image = np.asarray(Image.open(image_path).convert("RGB"))
    emb, content = net.embed(image)
    assert content == (64, 64)
    import dataset
    import model as mobile_sam

    x = torch.from_numpy(np.array(dataset.resize_image(image, 64))).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        ref = model.encoder(mobile_sam.normalize_image(x))
        torch.testing.assert_close(emb, ref, atol=1e-4, rtol=1e-4)
        low, _ = net.decode(emb, np.array([[10.0, 15.0]]), None)
        ref_low, _ = model.head(ref, points=(torch.tensor([[[10.0, 15.0]]]), torch.ones(1, 1)))
        torch.testing.assert_close(low, ref_low, atol=1e-4, rtol=1e-4)


def test_other_heads_and_bad_files_are_refused(golden, tmp_path):
    config = {"pretrained": None, "head": "hv", "input_size": 64, "lora_rank": 0}
    path = tmp_path / "hv.pth"
    nm.save_checkpoint(path, nm.build_model(config), config, train.default_postprocess("hv"))
    with pytest.raises(UserError, match=r"hv\.pth: a --head hv model has no prompt decoder"):
        prompts.load_prompt_net(path, torch.device("cpu"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pt: not a readable checkpoint"):
        prompts.load_prompt_net(junk, torch.device("cpu"))


def test_csv_parsing(tmp_path):
    p = tmp_path / "points.csv"
    p.write_text("# my clicks\nx, y\n1, 2\n\n3.5 ,4\n")
    pts, lines = prompts.read_points(p)
    assert pts.tolist() == [[1.0, 2.0], [3.5, 4.0]] and lines == [3, 5]
    p.write_text("1 2\n3 4\n")  # whitespace separated
    assert prompts.read_points(p)[0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    p.write_text("1,2\n3\n")
    with pytest.raises(UserError, match=r"points\.csv: line 2: expected x, y \(2 numbers\), got '3'"):
        prompts.read_points(p)
    p.write_text("x,y\n")
    with pytest.raises(UserError, match="no prompts"):
        prompts.read_points(p)
    b = tmp_path / "boxes.csv"
    b.write_text("10,10,5,20\n")
    with pytest.raises(UserError, match=r"boxes\.csv: line 1: box \(10, 10, 5, 20\) has x1 < x0"):
        prompts.read_boxes(b)
    with pytest.raises(UserError, match="file not found"):
        prompts.read_points(tmp_path / "nope.csv")


def test_window_choice_and_compose():
    # a point near x = 500 in a 1000-px axis with windows at 0 and 488 (size 512): the second is more central
    assert prompts.choose_window((500, 256, 500, 256), [0], [0, 488], 512, 512) == (0, 488)
    assert prompts.choose_window((0, 0, 600, 10), [0], [0, 488], 512, 512) is None
    p = prompts.Prompt("point", np.array([1.0, 1.0]), "t:1")
    a = prompts.PromptMask(p, (0, 0, 4, 4), (0, 0), np.ones((2, 3), bool), np.full((2, 3), 1.0, np.float32), 0.9)
    b = prompts.PromptMask(p, (0, 0, 4, 4), (1, 1), np.ones((2, 2), bool), np.full((2, 2), 2.0, np.float32), 0.8)
    empty = prompts.PromptMask(p, (0, 0, 4, 4), (0, 0), np.zeros((0, 0), bool), np.zeros((0, 0), np.float32), 0.1)
    labels, assigned = prompts.compose([a, empty, b], (4, 4))
    assert [i for _, i in assigned] == [1, 0, 2]
    assert labels.tolist() == [[1, 1, 1, 0], [1, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 0]]
    base = np.array([[5, 0, 0, 0]] * 4, dtype=np.uint16)
    merged, assigned = prompts.compose([a, b], (4, 4), base)
    assert [i for _, i in assigned] == [6, 7]
    assert merged.tolist() == [[6, 6, 6, 0], [6, 7, 7, 0], [5, 7, 7, 0], [5, 0, 0, 0]]


def test_merge_labels_must_match_the_image(tmp_path):
    path = tmp_path / "l.tif"
    tifffile.imwrite(path, np.zeros((10, 12), np.uint16))
    with pytest.raises(UserError, match=r"--merge_into .*l\.tif: label map is 12 x 10 pixels, the image 8 x 8"):
        prompts.read_merge_labels(path, (8, 8))


def test_merge_into_without_prompts_is_an_error(golden, tmp_path, capsys):
    code = main.main(["predict", "--model_path", str(golden["weights"]), "--input", str(golden["image_path"]),
                      "--merge_into", str(tmp_path / "x.tif"), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "--merge_into: give the prompts with --points" in capsys.readouterr().err


def test_tiled_image_prompt_goes_to_its_window(reference_dir, tmp_path, one_torch_thread):
    """An image larger than the window: the prompt is decoded in the window where it is most central, and the
    mask lands at the right place (two paths agree: the whole image vs that window cut out by hand)."""
    config = {"pretrained": str(reference_dir / "mobile_sam_random_weights.pt"), "head": "sam", "input_size": 64,
              "lora_rank": 0, "train_only_lora": True, "tile_size": 128}
    path = tmp_path / "sam.pth"
    nm.save_checkpoint(path, nm.build_model(config), config, train.default_postprocess("sam"))
    net = prompts.load_prompt_net(path, torch.device("cpu"))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    point = prompts.Prompt("point", np.array([250.0, 150.0]), "t:1")
    (pm,) = prompts.segment_prompts(net, image, [point])
    # windows start at x 0, 96, 172 and y 0, 72 (tile 128, overlap 32): (250, 150) is most central in (72, 172)
    assert pm.window == (72, 172, 128, 128)
    (ref,) = prompts.segment_prompts(net, np.ascontiguousarray(image[72:, 172:]),
                                     [prompts.Prompt("point", np.array([250.0 - 172, 150.0 - 72]), "t:1")])
    assert ref.window == (0, 0, 128, 128)
    full = np.zeros(image.shape[:2], bool)
    y, x = pm.origin
    full[y:y + pm.mask.shape[0], x:x + pm.mask.shape[1]] = pm.mask
    expected = np.zeros(image.shape[:2], bool)
    y, x = ref.origin
    expected[72 + y:72 + y + ref.mask.shape[0], 172 + x:172 + x + ref.mask.shape[1]] = ref.mask
    assert np.array_equal(full, expected) and pm.iou == pytest.approx(ref.iou, abs=1e-5)
    big_box = prompts.Prompt("box", np.array([10.0, 10.0, 200.0, 60.0]), "boxes.csv:4")
    with pytest.raises(UserError, match=r"boxes\.csv:4: box \(10, 10, 200, 60\) is larger than a window \(128 x 128"):
        list(prompts.segment_prompts(net, image, [big_box]))
