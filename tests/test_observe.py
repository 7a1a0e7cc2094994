"""Metric logging: one fetch per interval, every step in metrics.jsonl, phase-aware keys, the NaN stop."""

import json

import jax.numpy as jnp
import pytest

from sprintjax.observe import MetricsLog, NonFiniteLoss


def test_metrics_jsonl_keeps_each_phase_keys_and_stops_on_the_device_streak(tmp_path):
    log = MetricsLog(tmp_path, {0: "g_loss", 1: "d_loss"}, max_nonfinite=3, num_steps=10, log_every=2)
    row = lambda g, d, phase, streak=0, halted=0: {  # noqa: E731  (what Distiller.phase_step + train.guarded give)
        ("d_loss" if phase else "g_loss"): jnp.float32(d if phase else g), "phase": jnp.int32(phase),
        "ran": jnp.int32(1), "nonfinite_run": jnp.int32(streak), "halted": jnp.int32(halted)}
    log.add(1, row(1.5, 0.0, 0))
    log.add(2, row(0.0, 0.7, 1))
    log.flush()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "g_loss": 1.5, "phase": 0.0}, {"step": 2, "d_loss": pytest.approx(0.7), "phase": 1.0}]
    log.last_saved = tmp_path / "checkpoints" / "2"
    nan = float("nan")
    log.add(3, row(nan, 0.0, 0, streak=1))
    log.add(4, row(0.0, 0.5, 1))  # applied: the streak restarts
    log.add(5, row(nan, 0.0, 0, streak=1))
    log.add(6, row(nan, 0.0, 0, streak=2))
    log.flush()
    log.add(7, row(nan, 0.0, 0, streak=3))
    log.add(8, row(0.0, 0.0, 0, streak=3, halted=1))  # ran after the stop on device: did nothing
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive non-finite steps \(iterations 5-7, their updates "
                                            r"skipped\); stopped. the last checkpoint, saved before them, is "
                                            r".*checkpoints/2"):
        log.flush()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # the streak is reported, the halted step is not
    log.close()


def test_guarded_step_stops_at_exactly_max_nonfinite_consecutive_skips():
    """A toy step that skips (non-finite) on chosen iterations: the device streak counts them, resets on an
    applied step, and from the max_nonfinite-th skip in a row on the state no longer changes."""
    import jax
    from flax import struct

    from sprintjax.train import guarded

    class Toy(struct.PyTreeNode):
        step: jax.Array
        calls: jax.Array  # counts every executed (not halted) call

    bad = {2, 4, 5, 6, 7, 8}  # 1-based calls that come out non-finite

    def step_fn(state, batch, rng):
        ok = ~jnp.isin(state.calls + 1, jnp.array(sorted(bad)))
        return state.replace(step=state.step + ok, calls=state.calls + 1), {"loss": jnp.where(ok, 1.0, jnp.nan)}

    run = jax.jit(guarded(step_fn, max_nonfinite=3))
    carry = (Toy(step=jnp.int32(0), calls=jnp.int32(0)), jnp.int32(0))
    seen = []
    for _ in range(9):
        carry, m = run(carry, None, jax.random.key(0))
        seen.append((int(m["nonfinite_run"]), int(m["halted"])))
    assert seen == [(0, 0), (1, 0), (0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 1), (3, 1)]
    assert int(carry[0].calls) == 6 and int(carry[0].step) == 2  # calls 7-9 never ran
