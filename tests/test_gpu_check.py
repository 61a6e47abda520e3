"""bench/gpu_check.py, the script a lent GPU machine runs, at tiny sizes on this CPU: so it cannot rot."""

import json


def test_the_gpu_check_runs_at_tiny_sizes_and_reports_every_figure(tmp_path):
    from bench.gpu_check import main

    result = main(["--tiny", "--out", str(tmp_path / "check.json")])
    assert json.loads((tmp_path / "check.json").read_text()) == result
    assert result["wall_s"] > 0 and result["decode"]["components"] in (3, 4)
    assert result["decode"]["cpu_per_core_32"] > 0
    assert set(result["forward"]["resnet18@32"]) == {"fp32", "bf16"}  # --tiny: no compile
    assert all(v > 0 for v in result["forward"]["resnet18@32"].values())
    assert {"plain_actor", "plain_forward", "plain_share", "tta_actor", "tta_forward", "tta_share"} == set(
        result["predictor"]) and all(v > 0 for v in result["predictor"].values())
    assert result["train"]["resnet18@32"] > 0
