"""One table says which way is better for every metric the platform logs (flowmatch.metrics.directions); the
studies take their columns' and claims' directions from it and refuse a study file that contradicts it."""

from pathlib import Path

import pytest

from flowmatch.metrics.directions import arrow, direction, quantity
from flowmatch.studies.spec import StudyError, load_study

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("metric, expected", [
    ("val/caption_acc_euler25_cfg1p5", "higher"), ("test/caption_acc_syn_dopri5", "higher"), ("val/placement_acc_euler25_wide", "higher"),
    ("val/psnr", "higher"), ("val/acc", "higher"),
    ("val/loss", "lower"), ("val/loss_t0.125", "lower"), ("val/loss_bucket_32x32", "lower"), ("train/loss", "lower"),
    ("val/fd_euler25", "lower"), ("val/fd_ratio_euler25_cfg1p5", "lower"), ("val/w2_dopri5", "lower"), ("val/mmd_euler8", "lower"),
    ("val/nfe_dopri5", "lower"), ("val/straightness_normalized", "lower"),
    ("val/fd_real", None), ("test/caption_acc_syn_real_wide", None), ("train/attn_logit_max", None), ("epoch", None),
    ("val/something_new", None),
])
def test_direction_of_logged_names(metric, expected):
    assert direction(metric) == expected
    assert arrow(metric) == {"higher": "↑", "lower": "↓", None: ""}[expected]


def test_the_longest_quantity_wins():
    assert quantity("val/caption_acc_syn_real_square") == "caption_acc_syn_real"  # not caption_acc_syn or caption_acc
    assert quantity("val/fd_ratio_euler1") == "fd_ratio" and quantity("val/fd_real") == "fd_real"
    assert quantity("val/accuracy_of_x") is None  # "acc" must be followed by "_" or end the name


def test_studies_take_directions_from_the_table(tmp_path):
    study = load_study("architectures")
    cols = {c["metric"]: c["higher"] for c in study.report["columns"]}
    assert cols["val/caption_acc_euler25_cfg1p5"] is True and cols["val/loss"] is False
    claims = [c for c in study.report["claims"] if c["metric"] == "val/caption_acc_euler25_cfg1p5"]
    assert claims and all(c["higher"] is True for c in claims)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {REPO / 'experiments' / 'toy2d_rf.yaml'}\nvariants: {{a: {{}}}}\nbudgets: {{small: {{}}}}\n"
                   "report: {kind: comparison, columns: [{metric: val/w2_euler8, label: w2}, {metric: val/caption_acc_euler25, label: acc, higher: false}]}\n")
    with pytest.raises(StudyError, match=r"report.columns\[1\]: higher: false contradicts the platform's direction for "
                                         r"'val/caption_acc_euler25' \(higher is better"):
        load_study(str(bad))
