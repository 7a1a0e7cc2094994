"""sprintjax's generator step against a PyTorch reference step, on this machine's CPU, in one run (not in CI).

    python benchmarks/vs_pytorch.py [--hidden 512 --layers 8 --latent 16 --batch 8 --caption-len 64 --repeats 3]

The PyTorch step is what a user would write instead: diffusers' `SanaTransformer2DModel` as teacher and student
(the same weights, through the conversion table), `torch.func.jvp` for the sCM tangent (cross-attention as an
explicit softmax: fused SDPA has no forward-mode AD), the teacher's classifier-free guidance in one batched call,
the LADD generator loss through teacher features and the discriminator heads, backward, global-norm clipping and
AdamW. Both sides get the same random draws (`Distiller.generator_draws`), so before any timing the script checks
that the two steps compute the same losses and gradient norm. Then it times the whole generator step and the
student JVP alone, as medians of interleaved runs, and prints the ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from step_cost import model_args, model_config  # noqa: E402  (the same benchmark model; run from benchmarks/)


def torch_parts():
    """The PyTorch reference: an explicit-softmax attention processor and the generator step."""
    import torch
    import torch.nn.functional as F

    class ExplicitSoftmaxAttention:
        """diffusers' SanaAttnProcessor2_0 with softmax(q k^T / sqrt(d) + mask) v written out (forward-mode AD)."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            b = hidden_states.shape[0]
            q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
            if attn.norm_q is not None:
                q, k = attn.norm_q(q), attn.norm_k(k)
            heads, dh = attn.heads, k.shape[-1] // attn.heads
            q, k, v = (a.view(b, -1, heads, dh).transpose(1, 2) for a in (q, k, v))
            logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], b)
                logits = logits + mask.view(b, heads, -1, mask.shape[-1])
            out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, heads * dh)
            return attn.to_out[1](attn.to_out[0](out))

    class StopForward(Exception):
        """Raised by a hook after the last feature block: the teacher's remaining blocks are not run."""

    def flow_input(x_hat, t):
        """(x_FM, t_FM, scale) of the flow model for TrigFlow (x_hat, t)."""
        tf = torch.sin(t) / (torch.sin(t) + torch.cos(t))  # Eq. 6
        tb = tf[:, None, None, None]
        scale = torch.sqrt(tb**2 + (1 - tb) ** 2)
        return x_hat * scale, tf, scale  # Eq. 7

    def flow_to_trigflow(velocity, x_hat, t):  # Prop. 3.1 (Eq. 6-8), as sprintjax.trigflow
        x_fm, tf, scale = flow_input(x_hat, t)
        tb = tf[:, None, None, None]
        v, aux = velocity(x_fm, tf)
        return ((1 - 2 * tb) * x_fm + (1 - 2 * tb + 2 * tb**2) * v) / scale, aux  # Eq. 8

    class TorchGeneratorStep:
        """One SANA-Sprint generator iteration (Eq. 9 + 11) in PyTorch on diffusers models."""

        def __init__(self, teacher, student, logvar, heads, cfg, blocks, null_caption):
            self.teacher, self.student, self.logvar, self.heads = teacher, student, logvar, heads
            self.cfg, self.blocks, self.null = cfg, blocks, null_caption
            for m in (teacher, student):
                for blk in m.transformer_blocks:
                    blk.attn2.set_processor(ExplicitSoftmaxAttention())
            teacher.requires_grad_(False)
            self.params = [*student.parameters(), *logvar.parameters()]
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr_g, betas=cfg.betas[:2], eps=1e-8,
                                         weight_decay=cfg.weight_decay, foreach=True)
            self.cond = {}
            student.time_embed.register_forward_hook(lambda m, i, out: self.cond.__setitem__("cond", out[1]))

        # -------------------------------------------------------- models
        def teacher_dxt_dt(self, x_t, t, y, mask, w):  # dx_t/dt = sigma_d [F_u + w (F_c - F_u)] (facts §3)
            sd, b = self.cfg.sigma_d, x_t.shape[0]
            both_y = torch.cat([self.null.expand(b, -1, -1), y])
            both_m = torch.cat([mask, mask])
            vel = lambda x, tf: (self.teacher(x, encoder_hidden_states=both_y, timestep=tf,  # noqa: E731
                                              encoder_attention_mask=both_m, return_dict=False)[0], None)
            F2, _ = flow_to_trigflow(vel, torch.cat([x_t, x_t]) / sd, torch.cat([t, t]))
            return sd * (F2[:b] + w[:, None, None, None] * (F2[b:] - F2[:b]))

        def student_F(self, y, mask, w):
            """F_theta(x_hat, t) -> (F, logvar [B]); logvar = Linear(the time embedding)."""
            g = w * self.student.config.guidance_embeds_scale

            def vel(x_fm, tf):
                v = self.student(x_fm, encoder_hidden_states=y, timestep=tf, guidance=g,
                                 encoder_attention_mask=mask, return_dict=False)[0]
                return v, self.logvar(self.cond["cond"])[:, 0]

            return lambda x_hat, t: flow_to_trigflow(vel, x_hat, t)

        def teacher_features(self, x_hat, t, y, mask):
            """Tokens after the feature blocks, on the TrigFlow-transformed input (Prop. 3.1)."""
            feats, last = {}, max(self.blocks)

            def hook(i):
                def fn(module, inputs, out):
                    feats[i] = out
                    if i == last:
                        raise StopForward
                return fn

            handles = [self.teacher.transformer_blocks[i].register_forward_hook(hook(i)) for i in self.blocks]
            x_fm, tf, _ = flow_input(x_hat, t)
            try:
                self.teacher(x_fm, encoder_hidden_states=y, timestep=tf, encoder_attention_mask=mask,
                             return_dict=False)
            except StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
            return [feats[i] for i in self.blocks]

        def head(self, p, x):
            """StyleGAN-T head on tokens [B, N, C] -> logits [B, N] (facts §5), no state update (G step)."""
            vb = self.cfg.disc_virtual_batch

            def conv(q, h):
                k, c_in, c_out = q["kernel"].shape
                w_mat = q["kernel"].reshape(k * c_in, c_out).T
                sigma = q["u"] @ (w_mat @ q["v"])  # spectral norm from the stored power-iteration vectors
                h = h.transpose(1, 2)
                if k > 1:
                    h = F.pad(h, (k // 2, k // 2), mode="circular")
                return (F.conv1d(h, (q["kernel"] / sigma).permute(2, 1, 0)) + q["bias"][:, None]).transpose(1, 2)

            def bn(q, h):  # local batch norm over groups of ~vb samples
                b = h.shape[0]
                g = -(-b // vb)
                hg = h.reshape(g, b // g, *h.shape[1:])
                mean = hg.mean(dim=(1, 2), keepdim=True)
                var = (hg - mean).square().mean(dim=(1, 2), keepdim=True)
                return ((hg - mean) * torch.rsqrt(var + 1e-5)).reshape(h.shape) * q["scale"] + q["bias"]

            block = lambda h, c, n: F.leaky_relu(bn(p[n], conv(p[c], h)), 0.2)  # noqa: E731
            h = block(x, "conv_in", "bn_in")
            h = (block(h, "conv_res", "bn_res") + h) / math.sqrt(2.0)
            return conv(p["cls"], h)[..., 0]

        # -------------------------------------------------------- the step
        def jvp(self, x_t, t, dxt_dt, y, mask, w):
            """The fused sCM JVP: (F_theta, dF/dt along the rearranged tangent, logvar)."""
            sd = self.cfg.sigma_d
            cs = torch.cos(t) * torch.sin(t)
            return torch.func.jvp(self.student_F(y, mask, w), (x_t / sd, t),
                                  (cs[:, None, None, None] * dxt_dt / sd, cs), has_aux=True)

        def loss(self, batch, rv, step: int):
            """1.0 * L_sCM (Eq. 9) + 0.5 * L_adv^G (Eq. 11), with sprintjax's draws `rv`."""
            cfg, sd = self.cfg, self.cfg.sigma_d
            x0, y, mask = batch["latents"] * sd, batch["caption"], batch["caption_mask"]
            w, t = rv["w"], rv["t"]
            bt = lambda a: a[:, None, None, None]  # noqa: E731
            x_t = torch.cos(bt(t)) * x0 + torch.sin(bt(t)) * rv["z"]
            with torch.no_grad():
                dxt_dt = self.teacher_dxt_dt(x_t, t, y, mask, w)
            F_theta, dF, logvar = self.jvp(x_t, t, dxt_dt, y, mask, w)
            dF, F_minus = dF.detach(), F_theta.detach()
            r = min(1.0, (step + 1) / cfg.tangent_warmup_steps)
            c, s = torch.cos(bt(t)), torch.sin(bt(t))
            g = -c * c * (sd * F_minus - dxt_dt) - r * (c * s * x_t + sd * dF)  # Eq. 5, 9
            g = g / (g.square().sum(dim=(1, 2, 3), keepdim=True).sqrt() + cfg.tangent_norm_c)
            weight = 1.0 / (sd * torch.tan(t))
            scm = (bt(weight / torch.exp(logvar)) * (F_theta - F_minus - g).square() + bt(logvar)).mean()
            t2, t_d = rv["t2"], rv["t_d"]
            x_t2 = torch.cos(bt(t2)) * x0 + torch.sin(bt(t2)) * rv["z2"]
            F2, _ = self.student_F(y, mask, w)(x_t2 / sd, t2)
            x0_hat = torch.cos(bt(t2)) * x_t2 - torch.sin(bt(t2)) * sd * F2  # Eq. 4
            x_d = torch.cos(bt(t_d)) * x0_hat + torch.sin(bt(t_d)) * rv["z_d"]
            feats = self.teacher_features(x_d / sd, t_d, y, mask)
            logits = torch.cat([self.head(self.heads[f"block_{i}"], f)
                                for i, f in zip(self.blocks, feats, strict=True)], 1)
            adv = -logits.mean()
            return cfg.scm_weight * scm + cfg.adv_weight * adv, {"scm_loss": scm.detach(), "adv_loss": adv.detach()}

        def step(self, batch, rv, step: int):
            self.opt.zero_grad(set_to_none=True)
            total, metrics = self.loss(batch, rv, step)
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            if torch.isfinite(gnorm):
                self.opt.step()
            return dict(metrics, g_loss=total.detach(), g_grad_norm=gnorm)

    return TorchGeneratorStep


def to_torch(tree):
    import jax
    import numpy as np
    import torch

    return jax.tree.map(lambda a: torch.from_numpy(np.array(a, np.float32)), tree)


def build(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import SanaTransformer2DModel

    from sprintjax.convert.table import params_to_state_dict
    from sprintjax.distill import Distiller
    from sprintjax.distill_config import DistillConfig
    from sprintjax.model import SanaTransformer

    cfg = model_config(args)
    dcfg = DistillConfig(optimizer="adamw", lr_g=1e-5, warmup_steps_g=0, tangent_warmup_steps=100,
                         disc_layers=(args.layers // 4, args.layers // 2))
    d = Distiller(cfg, dcfg)
    rng = np.random.default_rng(0)
    b, L = args.batch, args.caption_len
    mask = np.ones((b, L), np.float32)
    mask[:, L - L // 4:] = 0  # padded caption tails exercise the attention mask
    shape = (b, args.latent_channels, args.latent, args.latent)
    batch = {"latents": jnp.asarray(rng.standard_normal(shape), jnp.float32),
             "caption": jnp.asarray(rng.standard_normal((b, L, args.caption_channels)), jnp.float32),
             "caption_mask": jnp.asarray(mask)}
    null = jnp.asarray(rng.standard_normal((L, args.caption_channels)) * 0.1, jnp.float32)
    teacher_params = SanaTransformer(cfg).init(jax.random.key(0))
    state = d.init(teacher_params, null, jax.random.key(1))
    # The student's guidance embedder starts as an exact no-op; perturb it so the parity check covers it.
    student = state.student
    ge = student["net"]["time_embed"]["guidance_embedder"]["linear_2"]
    ge = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape) * 0.02, ge)
    student["net"]["time_embed"]["guidance_embedder"]["linear_2"] = ge
    state = state.replace(student=student)

    def diffusers_model(params, c):
        c = c.replace(dtype="float32", remat="none", scan_layers=True)
        sd = params_to_state_dict(params, c, SanaTransformer(c).param_shapes())
        m = SanaTransformer2DModel(**{k: v for k, v in c.to_diffusers().items() if not k.startswith("_")})
        m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
        return m

    logvar = torch.nn.Linear(cfg.hidden_size, 1)
    with torch.no_grad():
        logvar.weight.copy_(torch.from_numpy(np.array(student["logvar"]["kernel"]).T))
        logvar.bias.copy_(torch.from_numpy(np.array(student["logvar"]["bias"])))
    heads_t = {n: {k: {**to_torch(p[k]), **to_torch(state.heads_state[n].get(k, {}))} for k in p}
               for n, p in state.heads.items()}  # params with their spectral-norm vectors
    step_t = torch_parts()(diffusers_model(teacher_params, cfg),
                           diffusers_model(student["net"], cfg.replace(guidance_embeds=True)), logvar, heads_t,
                           dcfg, d.blocks, to_torch(null)[None])
    return cfg, d, state, batch, step_t


def median_interleaved(fns: dict, repeats: int, settle: int = 1) -> dict:
    """{name: median seconds}, the candidates run in turn each round so load drifts hit them alike. Each
    timed call follows `settle` untimed calls of the same candidate: the first sprintjax step after a PyTorch
    step took 4.9 s where the steady state is 2.4 s (hidden 256, 6 layers, batch 8; the memory the other
    framework used and released is faulted in again), a cost neither framework pays when it trains alone."""
    import numpy as np

    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> None:
    import jax
    import numpy as np
    import torch

    from sprintjax import scm

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(p)
    p.add_argument("--scan", action="store_true",
                   help="sprintjax scans over the blocks, rematerialised with the dots policy as in the pod recipes "
                        "(default: unrolled, no remat)")
    args = p.parse_args(argv)
    cfg, d, state, batch, step_t = build(args)
    rng = jax.random.key(7)
    rv = d.generator_draws(rng, batch["latents"].shape)
    batch_t, rv_t = to_torch(batch), to_torch(rv)

    # ---- same semantics: losses and gradient norm of one step, from the same weights and draws
    g_step = jax.jit(d.generator_step)
    _, m_jax = jax.block_until_ready(g_step(state, batch, rng))
    m_t = step_t.step(batch_t, rv_t, int(state.step))
    print("\nparity (same weights, same draws):")
    for k in ("scm_loss", "adv_loss", "g_loss", "g_grad_norm"):
        a, b = float(m_jax[k]), float(m_t[k])
        print(f"  {k:12s} sprintjax {a: .6e}  pytorch {b: .6e}  rel. diff {abs(a - b) / max(abs(a), 1e-12):.1e}")

    # ---- timing: the whole generator step and the student JVP alone
    sd = d.cfg.sigma_d
    x0 = batch["latents"] * sd
    x_t = d._mix(x0, rv["z"], rv["t"])
    dxt = jax.jit(lambda s: scm.teacher_dxt_dt(d.teacher, s.teacher, s.null_caption, x_t, rv["t"],
                                              batch["caption"], batch["caption_mask"], rv["w"], sd))(state)
    cs = np.cos(rv["t"]) * np.sin(rv["t"])
    F = lambda s: scm.student_fn(d.student, s, batch["caption"], batch["caption_mask"], rv["w"])  # noqa: E731
    jvp_jax = jax.jit(lambda s: jax.jvp(F(s), (x_t / sd, rv["t"]), (cs[:, None, None, None] * dxt / sd, cs),
                                        has_aux=True))
    jax.block_until_ready(jvp_jax(state.student))
    x_t_t, dxt_t = to_torch(x_t), to_torch(dxt)
    y_t, mask_t = batch_t["caption"], batch_t["caption_mask"]

    def torch_jvp():
        with torch.no_grad():
            step_t.jvp(x_t_t, rv_t["t"], dxt_t, y_t, mask_t, rv_t["w"])

    step_no = int(state.step)
    fns = {"sprintjax generator step": lambda: jax.block_until_ready(g_step(state, batch, rng)),
           "pytorch generator step": lambda: step_t.step(batch_t, rv_t, step_no),
           "sprintjax jvp": lambda: jax.block_until_ready(jvp_jax(state.student)),
           "pytorch jvp": torch_jvp}
    torch_jvp()  # warm up
    med = median_interleaved(fns, args.repeats)
    form = "scanned, remat dots" if args.scan else "unrolled"
    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers ({form} in "
          f"sprintjax), {args.latent}x{args.latent} latent, batch {args.batch}, caption {args.caption_len}x"
          f"{args.caption_channels}; CPU x {os.cpu_count()} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs, each after a settling "
          "run of the same candidate\n")
    print("| what | sprintjax (s) | PyTorch (s) | PyTorch / sprintjax |")
    print("|---|---|---|---|")
    for what in ("generator step", "jvp"):
        a, b = med[f"sprintjax {what}"], med[f"pytorch {what}"]
        print(f"| {what} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
