"""benchmarks/parity.py on a tiny model: fit's validation, kpnet predict and the SavedModel
(in a process that imports only TensorFlow) give the same keypoints."""

from __future__ import annotations

import numpy as np
import pytest
from _benchmarks import load_benchmark


def _parity():
    return load_benchmark("parity")


@pytest.mark.slow  # a fit, an export and a TensorFlow subprocess: ~1 min on a quiet machine
def test_three_paths_agree_on_a_whole_frame_model(tmp_path):
    parity = _parity()
    small = ["data.synthetic_pins.num_train=16", "data.synthetic_pins.num_val=6",
             "train.steps_per_epoch=2", "model.pyramid_channels=16"]  # fmt: skip
    run = parity.train("pins", "float32", tmp_path / "run", small)
    spec, records, codec, xy_a, scores_a = parity.path_evaluate(run)
    assert codec.mode == "whole" and len(records) == 6
    xy_b, scores_b = parity.path_predict(run, records, codec, tmp_path)
    xy_c, scores_c = parity.path_saved_model(run, records, codec, tmp_path)
    for xy, scores in ((xy_b, scores_b), (xy_c, scores_c)):
        d = np.linalg.norm(xy - xy_a, axis=-1)
        assert d.mean() < 0.05 and d.max() < 0.05  # (the COCO results keep 3 decimals)
        assert np.abs(scores - scores_a).max() < 0.002
