"""A Mamba-2 decode state update that reads the SSM state once per tile of whole rows, against
mamba_ssm's `selective_state_update` (what the decode step runs on CUDA today).

    python experiments/gpu_ssm_state_update.py --out DIR [--variant mamba2_1.3b] [--batches 1,64,512]

Why: at batch 64 and 512 mamba_ssm's kernel is 60% and 84% of a mamba2_1.3b decode step and moves
the state at about half the bandwidth (docs/results.md, "What bounds the constant-cache families'
decode"). At d_state 128 it gives each program 4 rows of one head's state (1 KiB in bf16), so most
of a program's time is its fixed cost. Here a program owns BLOCK_P rows of one (sequence, head),
every row whole: one load and one store of the state, dt, B and C read once per tile.

For each batch and SSM state dtype (the model's bf16, and fp32, our default) the script times both
kernels on the variant's layer shape (CUDA graphs of 20 back-to-back updates over distinct
layers' states, so the L2 holds none of it), sweeps BLOCK_P and the warp count, checks every
configuration against the pure-torch reference (avengers.models.mamba.kernels.ref_ssd_step) and
prints microseconds per layer and the state's read + write bandwidth. Writes results.json under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_timing import graph_us, write_results  # noqa: E402

from avengers.models.mamba.kernels import ref_ssd_step  # noqa: E402
from avengers.models.registry import get_model_spec  # noqa: E402


@triton.jit
def _state_update_kernel(
    State,
    X,
    Dt,
    DtBias,
    A,
    B,
    C,
    D,
    Y,
    nheads,
    heads_per_group,
    P,
    N,
    s_sb,
    s_sh,
    s_sp,
    s_sn,
    s_xb,
    s_xh,
    s_xp,
    s_dtb,
    s_dth,
    s_bb,
    s_bg,
    s_bn,
    s_cb,
    s_cg,
    s_cn,
    s_yb,
    s_yh,
    s_yp,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr,
):
    """One program: rows [pid_p * BLOCK_P, +BLOCK_P) of the state of sequence b, head h.
    state = state * exp(dt * A) + dt * x B^T; y = state C (+ D x); dt = softplus(dt + dt_bias).
    Computed in fp32, the state stored back in its own dtype, y from the unrounded state."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp, mn = offs_p < P, offs_n < N
    s_ptr = State + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
    m = mp[:, None] & mn[None, :]
    s = tl.load(s_ptr, mask=m, other=0.0).to(tl.float32)
    x = tl.load(X + b * s_xb + h * s_xh + offs_p * s_xp, mask=mp, other=0.0).to(tl.float32)
    dt = tl.load(Dt + b * s_dtb + h * s_dth).to(tl.float32) + tl.load(DtBias + h).to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, torch's threshold
    b_vec = tl.load(B + b * s_bb + g * s_bg + offs_n * s_bn, mask=mn, other=0.0).to(tl.float32)
    c_vec = tl.load(C + b * s_cb + g * s_cg + offs_n * s_cn, mask=mn, other=0.0).to(tl.float32)
    s = s * tl.exp(dt * tl.load(A + h).to(tl.float32)) + (dt * x)[:, None] * b_vec[None, :]
    tl.store(s_ptr, s.to(State.dtype.element_ty), mask=m)
    y = tl.sum(s * c_vec[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D + h).to(tl.float32)
    tl.store(Y + b * s_yb + h * s_yh + offs_p * s_yp, y.to(Y.dtype.element_ty), mask=mp)


def state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor,
    block_p: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """ref_ssd_step's contract: state [b, h, p, n] updated in place; x [b, h, p]; raw dt [b, h];
    A, D, dt_bias [h]; B, C [b, g, n] -> y [b, h, p] in x's dtype. Any strides."""
    b, h, p, n = state.shape
    g = B.shape[1]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of the B/C groups ({g})")
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    block_p = min(block_p, triton.next_power_of_2(p))
    grid = (b * h, triton.cdiv(p, block_p))
    _state_update_kernel[grid](
        state,
        x,
        dt,
        dt_bias,
        A,
        B,
        C,
        D if D is not None else x,  # unread without D
        y,
        h,
        h // g,
        p,
        n,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        *y.stride(),
        BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(n),
        HAS_D=D is not None,
        num_warps=num_warps,
    )
    return y


def layer_inputs(batch: int, cfg, state_dtype: torch.dtype, device, layers: int = 1, seed: int = 0):
    """`layers` distinct states and one token's inputs at a Mamba-2 layer's shape, laid out as the
    decode step has them (x, B, C are views into one xBC row, as after the conv)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    states = [(torch.randn(batch, h, p, n, device=device, generator=gen) * 0.5).to(state_dtype) for _ in range(layers)]
    xbc = torch.randn(batch, h * p + 2 * g * n, device=device, generator=gen, dtype=torch.bfloat16)
    x, B, C = torch.split(xbc, [h * p, g * n, g * n], dim=-1)
    x, B, C = x.view(batch, h, p), B.view(batch, g, n), C.view(batch, g, n)
    dt = torch.randn(batch, h, device=device, generator=gen, dtype=torch.bfloat16)
    A = -torch.rand(h, device=device, generator=gen) * 4 - 0.5
    D = torch.randn(h, device=device, generator=gen)
    dt_bias = torch.randn(h, device=device, generator=gen) * 0.5
    return states, (x, dt, A, B, C, D, dt_bias)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="ssm_state_update")
    p.add_argument("--variant", default="mamba2_1.3b")
    p.add_argument("--batches", default="1,64,512")
    p.add_argument("--layers", type=int, default=20, help="distinct states per timed graph")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from avengers.models.mamba.kernels import _mamba_ssm_ops

    peer = _mamba_ssm_ops()["ssd_step"]
    cfg = get_model_spec(args.variant).config
    device = torch.device("cuda")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for state_dtype in (torch.bfloat16, torch.float32):
            states, inputs = layer_inputs(batch, cfg, state_dtype, device, args.layers)
            state_bytes = states[0].numel() * states[0].element_size()
            expect_state = states[0].clone()
            expect_y = ref_ssd_step(expect_state, *inputs)
            candidates = {"mamba_ssm": lambda s: peer(s, *inputs)}
            for block_p in (4, 8, 16, 32, 64):
                for warps in (1, 2, 4, 8):
                    candidates[f"ours BLOCK_P={block_p} warps={warps}"] = lambda s, bp=block_p, w=warps: state_update(
                        s, *inputs, block_p=bp, num_warps=w
                    )
            for name, run in candidates.items():
                got_state = states[0].clone()
                got_y = run(got_state)
                err = max(
                    ((got_y.float() - expect_y.float()).abs().max() / expect_y.float().abs().max()).item(),
                    ((got_state.float() - expect_state.float()).abs().max() / expect_state.float().abs().max()).item(),
                )
                us = graph_us(lambda i, run=run: run(states[i]), len(states))
                row = dict(
                    batch=batch,
                    state_dtype=str(state_dtype).removeprefix("torch."),
                    kernel=name,
                    us_per_layer=us,
                    state_tb_s=2 * state_bytes / us / 1e6,
                    max_rel_err=err,
                )
                rows.append(row)
                print(
                    f"batch {batch:4d} state {row['state_dtype']:8s} {name:32s} {us:9.1f} us "
                    f"{row['state_tb_s']:5.2f} TB/s  rel err {err:.1e}",
                    flush=True,
                )
    write_results(args.out, args.variant, rows)
    for (batch, dtype), group in _groups(rows).items():
        best = min((r for r in group if r["kernel"] != "mamba_ssm"), key=lambda r: r["us_per_layer"])
        peer_us = next(r["us_per_layer"] for r in group if r["kernel"] == "mamba_ssm")
        print(f"batch {batch} {dtype}: best {best['kernel']} {best['us_per_layer']:.1f} us vs mamba_ssm {peer_us:.1f}")
    return 0


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["state_dtype"]), []).append(r)
    return groups


if __name__ == "__main__":
    raise SystemExit(main())
