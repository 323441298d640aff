"""Ignore masks in training (issue 18, point 3): pixels under a sample's ignore mask take no part in any
loss term or target, through augmentation, window cutting and resizing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import export
import nuclei_model as nm
import utils


def _write_pair(folder: Path, name: str, image: np.ndarray, labels: np.ndarray, ignore: np.ndarray | None
                ) -> dataset.Sample:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.png")
    export.save_label_tiff(folder / f"{name}.tif", labels)
    mask = None
    if ignore is not None:
        mask = folder / f"{name}_ignore.png"
        Image.fromarray(ignore.astype(np.uint8) * 255).save(mask)
    return dataset.Sample(folder / f"{name}.png", folder / f"{name}.tif", mask, "all", name, f"images/{name}.png")


def _discs(rng: np.random.Generator, shape: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    image = np.clip(rng.normal([230, 180, 210], 8, (h, w, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, 7)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        labels[disc] = k
        image[disc] = rng.integers(40, 120, 3)
    return image, labels


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two images (and label maps) that differ only under an ignore mask (a disc and a band: nuclei cut by
    its border on both sides); each with and without its mask."""
    tmp = tmp_path_factory.mktemp("ignore")
    rng = np.random.default_rng(3)
    shape = (90, 110)
    image, labels = _discs(rng, shape, 25)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    ignore = ((yy - 30) ** 2 + (xx - 70) ** 2 <= 18 ** 2) | ((xx > 10) & (xx < 22))
    other_image, other_labels = _discs(np.random.default_rng(9), shape, 30)
    image_b, labels_b = image.copy(), labels.copy()
    image_b[ignore] = other_image[ignore]
    labels_b[ignore] = other_labels[ignore] + 100
    assert (labels_b != labels).any() and (image_b != image).any()
    return {
        "masked": [_write_pair(tmp / "a", "a", image, labels, ignore), _write_pair(tmp / "b", "a", image_b, labels_b, ignore)],
        "plain": [_write_pair(tmp / "c", "a", image, labels, None), _write_pair(tmp / "d", "a", image_b, labels_b, None)],
        "ignore": ignore,
    }


AUGMENT = dataset.AugmentConfig(flip=True, rotate=True, stain_jitter=0.1, color_jitter=0.2, blur_prob=1.0,
                                blur_sigma=1.5, noise_std=3.0)


def _datasets(samples, kind: str):
    if kind == "whole":
        return [dataset.NucleiDataset([s], 64, augment=AUGMENT, seed=1) for s in samples]
    return [dataset.WindowDataset([s], 64, tile_size=48, scale=0.8, augment=AUGMENT, seed=1) for s in samples]


def _grads(head: str, items: list[dict]) -> list[torch.Tensor]:
    utils.set_seed(0)
    net = nm.build_model({"input_size": 64, "pretrained": None, "head": head, "lora_rank": 2,
                          "train_only_lora": False}, pretrained=None)
    net.train()
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "foreground", "hv", "valid")}
    loss, _ = nm.compute_loss(net(batch["image"]), batch)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


@pytest.mark.parametrize("kind", ["whole", "windows"])
def test_items_do_not_depend_on_pixels_under_the_mask(pairs, kind):
    a, b = _datasets(pairs["masked"], kind)
    some_masked = False
    for epoch in (1, 2, 3):
        for data in (a, b):
            data.set_epoch(epoch)
        for i in range(len(a)):
            ia, ib = a[i], b[i]
            for key in ("image", "foreground", "hv", "valid"):
                assert torch.equal(ia[key], ib[key]), (epoch, i, key)
            masked = ia["valid"][0] < 0.5
            some_masked |= bool(masked.any())
            assert not ia["foreground"][0][masked].any() and not ia["hv"][:, masked].any()
            # the image under the mask is the fill colour
            assert (ia["image"][:, masked].T == torch.tensor(dataset.IGNORE_FILL, dtype=torch.uint8)).all()
    assert some_masked
    # control: without the mask the items differ (the test can fail)
    c, d = _datasets(pairs["plain"], kind)
    c.set_epoch(1), d.set_epoch(1)
    assert not torch.equal(c[0]["image"], d[0]["image"]) and torch.equal(c[0]["valid"], torch.ones_like(c[0]["valid"]))


@pytest.mark.parametrize("head", ["hv", "sam"])
def test_gradients_do_not_depend_on_pixels_under_the_mask(pairs, head, one_torch_thread):
    a, b = _datasets(pairs["masked"], "whole")
    wa, wb = _datasets(pairs["masked"], "windows")
    for data in (a, b, wa, wb):
        data.set_epoch(2)
    ga = _grads(head, [a[0], wa[0]])
    gb = _grads(head, [b[0], wb[0]])
    assert sum(float(g.abs().sum()) for g in ga) > 0
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    c, d = _datasets(pairs["plain"], "whole")
    c.set_epoch(2), d.set_epoch(2)
    gc, gd = _grads(head, [c[0]]), _grads(head, [d[0]])
    assert not all(torch.equal(x, y) for x, y in zip(gc, gd))  # control: the images do differ


def test_masked_loss_leaves_masked_outputs_out():
    """The loss has zero gradient with respect to every output pixel under the mask; all-ones `valid` is
    the unmasked loss."""
    g = torch.Generator().manual_seed(0)
    labels = np.zeros((2, 40, 40), np.int32)
    labels[:, 5:15, 5:18] = 1
    labels[:, 20:33, 22:36] = 2
    labels[1, 8:30, 10:14] = 3
    batch = {"foreground": torch.from_numpy((labels > 0)[:, None].astype(np.float32)),
             "hv": torch.from_numpy(np.stack([dataset.hv_targets(x) for x in labels]))}
    fg = torch.randn(2, 1, 40, 40, generator=g, requires_grad=True)
    hv = torch.randn(2, 2, 40, 40, generator=g, requires_grad=True)
    valid = torch.ones(2, 1, 40, 40)
    valid[0, :, 10:25, 12:30] = 0
    valid[1, :, :, :6] = 0
    loss, parts = nm.compute_loss({"foreground": fg, "hv": hv}, {**batch, "valid": valid})
    assert set(parts) == {"bce", "dice", "mse", "msge"} and all(v > 0 for v in parts.values())
    loss.backward()
    masked = valid.expand(2, 1, 40, 40) < 0.5
    assert float(fg.grad[masked].abs().max()) == 0.0
    assert float(hv.grad[masked.expand(2, 2, 40, 40)].abs().max()) == 0.0
    assert float(fg.grad[~masked].abs().max()) > 0
    plain, plain_parts = nm.compute_loss({"foreground": fg, "hv": hv}, batch)
    ones, ones_parts = nm.masked_loss({"foreground": fg, "hv": hv}, batch, torch.ones(2, 1, 40, 40))
    assert float(ones.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    assert ones_parts == pytest.approx(plain_parts, rel=1e-5)


def test_scoring_items_keep_the_image(pairs):
    """Validation/test items (`blank_image=False`) show the network the image as predict and evaluate do; the
    mask still leaves the loss and the targets."""
    masked, plain = pairs["masked"][0], pairs["plain"][0]
    scored = dataset.NucleiDataset([masked], 64, blank_image=False)[0]
    reference = dataset.NucleiDataset([plain], 64)[0]
    trained = dataset.NucleiDataset([masked], 64)[0]
    assert torch.equal(scored["image"], reference["image"]) and not torch.equal(trained["image"], reference["image"])
    assert torch.equal(scored["valid"], trained["valid"]) and torch.equal(scored["hv"], trained["hv"])
    assert bool((scored["valid"] < 0.5).any())
