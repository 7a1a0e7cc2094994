"""`sprintjax check-parity` end to end, checked by what it reports and writes."""

from PIL import Image

from sprintjax.convert.parity_demo import STEPS, run_parity_check


def test_parity_check_imports_samples_and_round_trips(tmp_path):
    report = run_parity_check(tmp_path, batch=2)
    for k in STEPS:
        assert report[f"steps_{k}"]["max_rel_diff_vs_diffusers"] < 1e-5
    assert report["round_trip_bit_exact"] is True
    grid = Image.open(tmp_path / "samples_1_2_4_steps.png")
    assert grid.size == (2 * (16 * 8 + 2) + 2, 3 * (16 * 8 + 2) + 2)
    assert (tmp_path / "params" / "model_config.json").is_file()
    assert (tmp_path / "diffusers_export" / "config.json").is_file()
