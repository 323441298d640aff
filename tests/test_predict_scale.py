"""`--tile_size` only chooses the window, never the magnification the network sees (issue 10, point 3).

The network here is a deterministic, scale-sensitive stand-in (`SizeTunedNet`): like a real model it only
finds nuclei of the size it was "trained" on, measured in NETWORK pixels (dark blobs whose area in the
network's input lies in a band). It runs behind the real `inference.model_maps_fn` (resizing, padding to a
multiple of 64, cropping, resizing back), so the test exercises the code that decides the scale. Before the
fix a 384-pixel window was squeezed into the 512-pixel input of a model trained on 256-pixel tiles
(1.5x smaller nuclei), the small discs fell out of the band and the counts differed by ~40 %.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

import dataset
import inference
import metrics
import nuclei_model
import postprocess
from test_predict import synthetic_slide

PP = postprocess.PostprocessConfig().to_dict()


class SizeTunedNet(nn.Module):
    """Foreground + HV maps of the dark blobs whose area, in network pixels, lies in [lo, hi]."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> dict:
        fgs, hvs = [], []
        for image in x.float().cpu().numpy():
            dark = image.mean(axis=0) < 150
            labels, n = ndimage.label(dark)
            areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
            keep = np.zeros(n + 1, bool)
            keep[1:] = (areas >= self.lo) & (areas <= self.hi)
            # blobs cut by the window edge are partial: trust them too (the blend weights ignore the edge)
            border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
            keep[border[border > 0]] = True
            kept = np.where(keep[labels], labels, 0)
            fgs.append(np.where(kept > 0, 12.0, -12.0)[None])
            hvs.append(dataset.hv_targets(kept))
        return {"foreground": torch.from_numpy(np.stack(fgs)).float(),
                "hv": torch.from_numpy(np.stack(hvs)).float()}


def fake_model_set(net: nn.Module, input_size: int, train_tile: int):
    member = nuclei_model.Member(fold=None, model=net, checkpoint_path=Path("none"))
    return nuclei_model.ModelSet([member], {"input_size": input_size, "tile_size": train_tile,
                                            "mpp": dataset.NUINSSEG_MPP}, dict(PP), False, Path("."))


def test_network_size_rounds_up_to_encoder_multiple():
    assert nuclei_model.network_size(256, 2.0) == (512, 512)
    assert nuclei_model.network_size(384, 2.0) == (768, 768)
    assert nuclei_model.network_size(300, 1.0) == (300, 320)
    assert nuclei_model.network_size(10, 1.0) == (10, 64)


def test_tile_size_does_not_change_the_magnification():
    # discs of radius 5-9 px; model trained on 256-pixel tiles at input 512 (2x): 314-1018 network px²
    image, truth = synthetic_slide(1024, 1536, seed=4)
    model_set = fake_model_set(SizeTunedNet(250, 1400), input_size=512, train_tile=256)
    assert inference.network_scale(model_set) == 2.0
    maps_fn = inference.model_maps_fn(model_set, device=torch.device("cpu"), amp=False)
    seen = []

    def recording(tiles):
        seen.append(tiles[0].shape[0])
        return maps_fn(tiles)

    a = inference.predict_image(model_set, image, 256, 64, maps_fn=recording, postprocess=PP, batch_size=8)
    b = inference.predict_image(model_set, image, 384, 128, maps_fn=recording, postprocess=PP, batch_size=8)
    assert set(seen) == {256, 384}
    n_true, n_a, n_b = int(truth.max()), len(np.unique(a)) - 1, len(np.unique(b)) - 1
    m = metrics.instance_metrics(a, b)
    assert abs(n_a - n_b) <= 0.03 * n_a, (n_a, n_b, n_true)
    assert m["pq"] >= 0.8, m["pq"]
    # and both are right: every disc found (the stand-in sees them at the trained size)
    assert metrics.instance_metrics(truth, a)["pq"] > 0.9
    # control: the same network fed at the wrong magnification (the old behaviour) misses the small discs
    old_fn = lambda tiles: nuclei_model.predict_maps_batch(model_set.models, tiles, 512, "cpu", amp=False)
    old = inference.predict_image(model_set, image, 384, 128, maps_fn=old_fn, postprocess=PP, batch_size=8)
    assert len(np.unique(old)) - 1 < 0.8 * n_a
