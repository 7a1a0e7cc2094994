"""Reading compiled HLO (sprintjax.hlo): collective bytes and the whole step's bytes and FLOPs with every loop's
trip count applied, checked against hand counts, closed forms and XLA's own cost analysis of loop-free programs."""

import jax
import jax.numpy as jnp
import pytest

from sprintjax.hlo import op_costs, roofline

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
    from sprintjax.hlo import by_kind, by_scope, collectives

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



def _chain(layers: int, scan: bool, batch=32, width=128):
    """The compiled gradient (in the weights) of `layers` tanh(h @ w_i) layers, scanned or unrolled."""
    def loss(w, x):
        if scan:
            return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()
        for i in range(layers):
            x = jnp.tanh(x @ w[i])
        return x.sum()

    return jax.jit(jax.grad(loss)).lower(jnp.ones((layers, width, width)), jnp.ones((batch, width))).compile()


@pytest.mark.parametrize("scan", [True, False])
def test_matmul_flops_count_every_layer(scan):
    """Closed form: each layer's forward, input gradient and weight gradient are (32 x 128) @ (128 x 128)
    matmuls; unrolled, XLA drops the input gradient of the first layer (nothing needs it)."""
    got = roofline(op_costs(_chain(6, scan).as_text()), 1.0, 1.0)["flops"]
    assert got == (3 * 6 - (0 if scan else 1)) * 2 * 32 * 128 * 128


def test_bytes_of_a_loop_free_program_equal_xla_cost_analysis():
    compiled = _chain(6, scan=False)
    got = roofline(op_costs(compiled.as_text()), 1.0, 1.0)["bytes"]
    assert got == pytest.approx(compiled.cost_analysis()["bytes accessed"], rel=0.02)


def test_a_scanned_stack_is_read_a_slice_per_trip():
    """Twice the layers, twice the bytes: a loop body that slices one layer out of the stacked weights (and
    writes one layer's residuals into a stack) reads and writes that layer only. Counting the whole stack per
    trip would make the bytes grow with the square of the depth."""
    six, twelve = (roofline(op_costs(_chain(n, scan=True).as_text()), 1.0, 1.0)["bytes"] for n in (6, 12))
    assert twelve / six == pytest.approx(2.0, rel=0.1)


TPU_HLO = """
%fused_slice (param_0: bf16[28,1152,1152], param_1: s32[]) -> bf16[1152,1152] {
  %param_0 = bf16[28,1152,1152]$T3 parameter(0)
  %param_1 = s32[]{:T(128)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %ds = bf16[1,1152,1152]$T3 dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,1152,1152}
  ROOT %b = bf16[1152,1152]$T2 bitcast(%ds)
}
%fused_dot (param_0: bf16[4096,1152], param_1: bf16[1152,1152]) -> f32[4096,1152] {
  %param_0 = bf16[4096,1152]$T2 parameter(0)
  %param_1 = bf16[1152,1152]$T2 parameter(1)
  ROOT %c = f32[4096,1152]{1,0:T(8,128)} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}
%fused_dus (param_0: f32[28,4096,1152], param_1: f32[4096,1152], param_2: s32[]) -> f32[28,4096,1152] {
  %param_0 = f32[28,4096,1152]{2,1,0:T(8,128)} parameter(0)
  %param_1 = f32[4096,1152]{1,0:T(8,128)} parameter(1)
  %param_2 = s32[]{:T(128)} parameter(2)
  %zero = s32[]{:T(128)} constant(0)
  %u = f32[1,4096,1152]{2,1,0:T(8,128)} bitcast(%param_1)
  ROOT %dus = f32[28,4096,1152]{2,1,0:T(8,128)} dynamic-update-slice(%param_0, %u, %param_2, %zero, %zero)
}
%fused_convert (param_0: f32[4096,1152]) -> bf16[4096,1152] {
  %param_0 = f32[4096,1152]{1,0:T(8,128)} parameter(0)
  ROOT %cv = bf16[4096,1152]$T2 convert(%param_0)
}
%cond (p: $STATE) -> pred[] {
  %p = $STATE parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(28)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}
%body (p: $STATE) -> $STATE {
  %p = $STATE parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %h = bf16[4096,1152]$T2 get-tuple-element(%p), index=1
  %w = bf16[28,1152,1152]$T3 get-tuple-element(%p), index=2
  %stack = f32[28,4096,1152]{2,1,0:T(8,128)} get-tuple-element(%p), index=3
  %wi = bf16[1152,1152]$T2 fusion(%w, %i), kind=kLoop, calls=%fused_slice, $SCM/ds"}
  %y = f32[4096,1152]{1,0:T(8,128)} fusion(%h, %wi), calls=%fused_dot, $SCM/dot"}
  %saved = f32[28,4096,1152]{2,1,0:T(8,128)} fusion(%stack, %y, %i), calls=%fused_dus, $SCM/dus"}
  %next_h = bf16[4096,1152]$T2 fusion(%y), kind=kLoop, calls=%fused_convert, $SCM/cv"}
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %t = $STATE tuple(%next, %next_h, %w, %saved)
}
ENTRY %main (a: bf16[4096,1152], b: bf16[28,1152,1152]) -> f32[4096,1152] {
  %a = bf16[4096,1152]$T2 parameter(0)
  %b = bf16[28,1152,1152]$T3 parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %stack = f32[28,4096,1152]{2,1,0:T(8,128)} broadcast(%zero), dimensions={}
  %init = $STATE tuple(%zero, %a, %b, %stack)
  %loop = $STATE while(%init), condition=%cond, body=%body
  %h = bf16[4096,1152]$T2 get-tuple-element(%loop), index=1
  %pre = (bf16[4096,1152]$T2, bf16[4096,1152]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) copy-start(%h)
  %on_chip = bf16[4096,1152]{1,0:T(8,128)(2,1)S(1)} copy-done(%pre)
  %rows = ((bf16[4096,1152]$T2), bf16[8,1152]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%h)
  ROOT %out = f32[4096,1152]{1,0:T(8,128)} fusion(%on_chip), kind=kLoop, calls=%fused_up
}
%fused_up (param_0: bf16[4096,1152]) -> f32[4096,1152] {
  %param_0 = bf16[4096,1152]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %up = f32[4096,1152]{1,0:T(8,128)} convert(%param_0)
}
""".replace("$STATE", "(s32[], bf16[4096,1152], bf16[28,1152,1152], f32[28,4096,1152])").replace(
    "$T3", "{2,1,0:T(8,128)(2,1)}").replace("$T2", "{1,0:T(8,128)(2,1)}").replace(  # libtpu's tiled bf16 layouts
    "$SCM", 'metadata={op_name="jit(run)/jvp(student_scm)')


def test_tpu_style_program_counted_by_hand():
    """A scanned layer as libtpu writes it (tiled layouts, a dot as a convolution): 28 trips of a weight slice,
    a matmul, a residual saved into a stack in place and a float32 -> bf16 conversion; then the result moved
    into on-chip memory by a prefetch and converted back from there."""
    r = roofline(op_costs(TPU_HLO), peak_flops=459e12, hbm_bandwidth=2765e9)
    tokens, width, trips = 4096, 1152, 28
    weight, act16, act32 = width * width * 2, tokens * width * 2, tokens * width * 4
    per_trip = {"slicing": (weight + 4) + weight  # the slice read and written (the stack is not read whole)
                + act32 + 4 + act32,  # the update read and written in place (the stack is not rewritten)
                "matmul": act16 + weight + act32, "convert": act32 + act16}
    want = {k: trips * v for k, v in per_trip.items()}
    # the stack's initial broadcast (a scalar in, the stack out) and the loop counter's add
    want["elementwise"] = 4 + trips * act32 + trips * 3 * 4
    # the result prefetched into on-chip memory (S(1)) once, then converted from there: only its write is HBM's
    want["prefetch"], want["convert"] = act16 + 8 * width * 2, want["convert"] + act32  # and 8 rows sliced
    got = {k: v["bytes"] for k, v in r["by_category"].items()}
    assert got == want
    assert r["flops"] == trips * 2 * tokens * width * width
    scm = r["by_scope"]["student_scm"]
    assert scm["bytes"] == sum(want.values()) - want["elementwise"] - want["prefetch"] - act32
    # the matmul (2 x 4096 x 1152 x 1152 FLOPs on 29 MiB: 368 FLOP/B) is above v5p's ridge point (166 FLOP/B)
    # and takes its FLOPs / peak; every other op its bytes / bandwidth
    matmul = trips * 2 * tokens * width * width / 459e12
    assert r["seconds"] == pytest.approx(matmul + (sum(want.values()) - want["matmul"]) / 2765e9, rel=1e-9)
