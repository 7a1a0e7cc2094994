"""Metric logging: one fetch per interval, every step in metrics.jsonl, phase-aware keys, the NaN stop."""

import json

import jax.numpy as jnp
import pytest

from sprintjax.observe import MetricsLog, NonFiniteLoss


def test_metrics_jsonl_keeps_each_phase_keys_and_stops_on_repeated_nans(tmp_path):
    log = MetricsLog(tmp_path, {0: "g_loss", 1: "d_loss"}, {0: {"g_loss"}, 1: {"d_loss"}}, max_nonfinite=3,
                     num_steps=10, log_every=2)
    log.add(1, {"g_loss": jnp.float32(1.5), "d_loss": jnp.float32(0.0), "phase": jnp.int32(0)})
    log.add(2, {"g_loss": jnp.float32(0.0), "d_loss": jnp.float32(0.7), "phase": jnp.int32(1)})
    log.flush()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "g_loss": 1.5, "phase": 0.0}, {"step": 2, "d_loss": pytest.approx(0.7), "phase": 1.0}]
    nan = jnp.float32(jnp.nan)
    log.add(3, {"g_loss": nan, "d_loss": jnp.float32(0.0), "phase": jnp.int32(0)})
    log.add(4, {"g_loss": jnp.float32(0.0), "d_loss": jnp.float32(0.5), "phase": jnp.int32(1)})  # finite: reset
    log.add(5, {"g_loss": nan, "d_loss": jnp.float32(0.0), "phase": jnp.int32(0)})
    log.add(6, {"g_loss": nan, "d_loss": jnp.float32(0.0), "phase": jnp.int32(0)})
    log.flush()
    log.add(7, {"g_loss": nan, "d_loss": jnp.float32(0.0), "phase": jnp.int32(0)})
    with pytest.raises(NonFiniteLoss, match="3 consecutive non-finite losses \\(last at step 7\\)"):
        log.flush()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7  # reported, not hidden
    log.close()
