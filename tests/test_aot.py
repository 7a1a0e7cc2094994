"""`sprintjax compile`: the training steps compile ahead of time for TPU topologies (libtpu, no TPU here) and
for fake CPU devices, and the report gives per-device memory and cost figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPRINTJAX = str(Path(sys.executable).parent / "sprintjax")


def compile_cli(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([SPRINTJAX, "compile", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_report(out, path, names):
    assert out.returncode == 0, out.stderr[-3000:]
    assert "figures per device" in out.stdout
    report = json.loads(Path(path).read_text())
    assert sorted(report) == sorted(names)
    for r in report.values():
        assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["flops"] > 0
        # The blocks are scanned: the compiled program's count has one block per loop, the model count all.
        assert r["model_flops"] * r["devices"] > 1.5 * r["flops"]
    return report


# full: ZeRO-3 blocks in a shard_map (sharding.fsdp_block); slow, as test_model.py's probe covers them in CI
@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_tiny_distillation_compiles_for_a_v5p_topology(tmp_path, remat):
    from sprintjax.aot import wire_bytes

    out = compile_cli("--config", "configs/tiny.py", "--topology", "v5p:2x2x1", "--config.mesh.fsdp=2",
                      f"--config.model.remat={remat}", "--json", str(tmp_path / "r.json"))
    report = check_report(out, tmp_path / "r.json", ["generator", "discriminator"])
    assert report["generator"]["mesh"] == {"data": 2, "fsdp": 2}
    assert report["generator"]["optimal_seconds"] > 0  # a TPU cost model figure
    assert 0 < report["generator"]["mfu_bound"] and report["generator"]["collective_bytes"]["all-gather"] > 0
    for r in report.values():  # activations stay batch-sharded (without: 1.7x / 2.5x in payload bytes alone)
        assert wire_bytes(r["collective_bytes"]) < 1.2 * wire_bytes(r["fsdp_minimum_bytes"])
    assert "arguments" in out.stdout and "temporaries" in out.stdout


def test_teacher_stage_compiles_for_fake_cpu_devices(tmp_path):
    out = compile_cli("--config", "configs/tiny.py:teacher", "--topology", "cpu:4", "--json", str(tmp_path / "r.json"))
    check_report(out, tmp_path / "r.json", ["train"])


HLO = """
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[4,256]{1,0} all-gather(%x), dimensions={0}, metadata={op_name="jit(run)/transpose(jvp(student_scm))/B/x"}
  %inner = (s32[], f32[8]) while(%t), condition=%cond.2, body=%body.2
}
%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(28)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
%body.2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %cp = (f32[16]{0}, f32[16]{0}, u32[]) collective-permute-start(%y), source_target_pairs={{0,1}}
}
%cond.2 (p: (s32[], f32[8])) -> pred[] {
  %c = u32[]{:T(128)} constant(3)
}
%fused (a: f32[64,64]) -> f32[2,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %rs = f32[2,64]{1,0} reduce-scatter(%a), dimensions={0}
}
%all-reduce-scatter.3 (input: f32[64,8]) -> f32[2,8] {
  %input = f32[64,8]{1,0} parameter(0)
  %ar.rs = f32[64,8]{1,0} all-reduce(%input), replica_groups={{0,1}}, to_apply=%add
  ROOT %ds = f32[2,8]{1,0} dynamic-slice(%ar.rs, %o, %z), dynamic_slice_sizes={2,8}
}
%wcond (p: (f32[4], u32[])) -> pred[] {
  %p = (f32[4], u32[]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=1
  %n = u32[]{:T(128)} constant(7)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}
%wbody (p: (f32[4], u32[])) -> (f32[4], u32[]) {
  %p = (f32[4], u32[]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=1
  %two = u32[]{:T(128)} constant(2)
  %cp = (f32[4]{0}, f32[4]{0}, u32[]{:S(2)}) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}
  %next = u32[]{:T(128)} add(%i, %two)
  ROOT %out = (f32[4], u32[]) tuple(%x, /*index=1*/%next)
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond.1, body=%body.1
  %one = u32[]{:T(128)} constant(1)
  %start = (f32[4], u32[]) tuple(%a, %one)
  %windowed = (f32[4], u32[]) while(%start), condition=%wcond, body=%wbody
  %ar = (f32[10]{0}, f32[6]{0}) all-reduce(%u, %v), to_apply=%add, metadata={op_name="jit(run)/jvp(teacher_cfg)/y"}
  %f = f32[2] fusion(%a), kind=kLoop, calls=%fused
  %g = f32[2,8] fusion(%b), calls=%all-reduce-scatter.3, metadata={op_name="jit(run)/transpose(jvp(student_ladd))/d"}
}
"""


def test_collective_bytes_count_every_loop_trip():
    from sprintjax.aot import by_kind, by_scope, collectives

    found = collectives(HLO)
    got = by_kind(found)
    assert got["all-gather"] == 28 * 4 * 256 * 2  # bf16 result, 28 trips
    # 28 x 3 trips (TPU layout on the bound), then a windowed-einsum-like loop: i = 1, 3, 5 (< 7), 3 trips
    assert got["collective-permute"] == 28 * 3 * 16 * 4 + 3 * 4 * 4
    # one inside a fusion call; libtpu's reduce-scatter (an all-reduce-scatter fusion) is not an all-reduce
    # a synchronous reduce-scatter counts its operand (its result is one device's share)
    assert got["all-reduce"] == (10 + 6) * 4 and got["reduce-scatter"] == 64 * 64 * 4 + 64 * 8 * 4
    assert got["all-to-all"] == 0
    scopes = by_scope(found)  # by the named scope of each model call in distill.py
    assert scopes["student_scm backward"] == got["all-gather"] and scopes["teacher_cfg"] == got["all-reduce"]
    assert scopes["student_ladd backward"] == 64 * 8 * 4  # a fusion's scope covers the ops it calls
    assert scopes["(no op_name)"] == got["collective-permute"] + 64 * 64 * 4


def test_unknown_topology_and_indivisible_batch_are_clear_errors():
    out = compile_cli("--config", "configs/tiny.py", "--topology", "v5p:banana")
    assert out.returncode == 2 and "cannot build TPU topology 'v5p:banana'" in out.stderr
    out = compile_cli("--config", "configs/tiny.py", "--topology", "cpu:3")
    assert out.returncode == 2 and "global batch 8 does not divide over the 3" in out.stderr


@pytest.mark.slow
def test_sana_sprint_600m_compiles_for_v5p_64_chips_and_fits(tmp_path):
    out = compile_cli("--config", "configs/sana_sprint_600m_1024.py", "--topology", "v5p:4x4x4",
                      "--json", str(tmp_path / "r.json"), timeout=1800)
    report = check_report(out, tmp_path / "r.json", ["generator", "discriminator"])
    for r in report.values():
        assert r["devices"] == 64 and r["peak_bytes_estimate"] < 95 * 2**30  # v5p HBM


def test_fsdp_minimum_counts_the_replica_all_reduce_of_hsdp_shards():
    import types

    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

    from sprintjax.aot import fsdp_minimum

    params = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32), "b": jax.ShapeDtypeStruct((16,), jnp.float32)}
    for data, shard_all_reduce in ((1, 0), (2, 8 * 16 * 4 // 4)):  # HSDP: the 1/4 shard, all-reduced over data
        mesh = AbstractMesh((data, 4), ("data", "fsdp"))
        sh = {"w": NamedSharding(mesh, PartitionSpec(None, "fsdp")), "b": NamedSharding(mesh, PartitionSpec())}
        got = fsdp_minimum(types.SimpleNamespace(params=params), types.SimpleNamespace(params=sh), "train",
                           "bfloat16", None)
        # teacher stage: w gathered in bf16 for the forward and the backward, its f32 gradient reduce-scattered
        assert got == {"all-gather": 2 * 8 * 16 * 2, "reduce-scatter": 8 * 16 * 4,
                       "all-reduce": 16 * 4 + shard_all_reduce}
