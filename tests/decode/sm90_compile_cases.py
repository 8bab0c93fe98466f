"""Compile the Triton kernels for sm_90 (H100/H200) without a GPU: `python tests/decode/sm90_compile_cases.py`.

Triton's CPU interpreter runs kernels as Python and accepts code the GPU compiler refuses (a
loop-carried variable whose type changes, for one); this compiles each kernel in the shapes of
its launches (constexprs, pointer dtypes, warps, stages) with ptxas, as the first GPU call would.
Prints one JSON line per case: {"case", "ok", "error", "registers", "stack_bytes"} (registers per
thread and stack frame bytes from cuobjdump -res-usage: a stack frame in these call-free kernels is
spilled registers); `--loops NAME`: also the SASS loops of the matching cases (`loops`). Exit
code 3: no sm_90 backend here.
Run without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_case(
    kernel,
    pointers: dict[str, str],
    constexprs: dict,
    floats: tuple[str, ...] = (),
    num_warps: int = 4,
    num_stages: int = 3,
    divisible: tuple[str, ...] = (),
):
    """Compile `kernel` (a JITFunction, or an autotuner's .fn) with pointer args typed as given,
    `floats` as fp32 scalars, every other non-constexpr argument as i32 (`divisible`: _compile)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuner (or heuristics) wraps it
        fn = fn.fn
    names = fn.arg_names
    unknown = set(pointers) | set(constexprs) | set(floats)
    if unknown - set(names):
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown - set(names))}")
    types = {n: pointers.get(n, "fp32" if n in floats else "i32") for n in names}
    return _compile(ASTSource, fn, types, constexprs, divisible, {"num_warps": num_warps, "num_stages": num_stages})


def compile_gluon_case(
    kernel, types: dict[str, str], constexprs: dict, num_warps: int = 4, divisible: tuple[str, ...] = ()
):
    """compile_case for a Gluon kernel: `types` names every non-i32 argument's type (tensor
    descriptors as 'tensordesc<...>')."""
    from triton.experimental.gluon._runtime import GluonASTSource

    return _compile(GluonASTSource, kernel, types, constexprs, divisible, {"num_warps": num_warps})


def _compile(source, fn, types: dict[str, str], constexprs: dict, divisible: tuple[str, ...], options: dict):
    """Compile fn as a launch specialises it: constexprs left out at their declared defaults,
    pointers 16-byte aligned, as torch's allocations are, and the integer arguments `divisible`
    (multiples of 16 at every launch) marked so."""
    names = fn.arg_names
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs and not p.has_default]
    if missing:
        raise ValueError(f"{fn.__name__} needs constexprs {missing}")
    constexprs = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default} | constexprs
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]] for n in names if signature[n].startswith("*") or n in divisible
    }
    src = source(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


def cases():
    from avengers.decode.kernels import triton_decode, triton_gemv
    from avengers.models.mamba import causal_conv_triton

    bf, f32 = "*bf16", "*fp32"
    gemv = triton_gemv._gemv_kernel
    for name, bb, x, out, norm, gate, swiglu, res, bn, bk, w in [
        ("gemv norm (QKV, LM head)", 1, bf, bf, True, False, False, False, 2, 2048, 8),
        ("gemv norm+swiglu (gate/up)", 1, bf, bf, True, False, True, False, 4, 1024, 4),
        ("gemv residual (Wo, W2)", 1, bf, bf, False, False, False, True, 8, 512, 2),
        ("gemv fp32 stream (Mamba-2 in_proj)", 1, f32, bf, True, False, False, False, 2, 2048, 8),
        ("gemv gated norm + fp32 residual (Mamba-2 out_proj)", 1, bf, f32, True, True, False, True, 2, 2048, 8),
        ("gemv batch 8 norm+swiglu", 8, bf, bf, True, False, True, False, 2, 1024, 4),
    ]:
        yield (
            name,
            functools.partial(
                compile_case,
                gemv,
                {"X": x, "NormW": bf, "Z": bf, "W": bf, "Res": out, "Out": out},
                dict(BB=bb, B=bb, NORM=norm, GATE=gate, SWIGLU=swiglu, RESIDUAL=res, GDC=True, BN=bn, BK=bk),
                ("eps",),
                w,
            ),
        )
    from avengers.decode.kernels import triton_mamba_step

    yield (
        "Mamba-2 in_proj + conv step",
        functools.partial(
            compile_case,
            triton_mamba_step._in_proj_conv_kernel,
            {"X": f32, "NormW": bf, "W": bf, "Out": bf, "Window": bf, "ConvW": bf, "ConvB": bf},
            dict(BB=1, B=1, WIDTH=4, SILU=True, GDC=True, BN=2, BK=2048),
            ("eps",),
            8,
        ),
    )
    yield (
        "hybrid attention RoPE + cache write (mamba_1.5b)",
        functools.partial(
            compile_case,
            triton_mamba_step._rope_write_kernel,
            {"QKV": bf, "Cos": f32, "Sin": f32, "Pos": "*i64", "Q": bf, "Kc": bf, "Vc": bf},
            dict(HD=128),
            (),
            1,
        ),
    )
    yield (
        "Mamba-2 conv step (batch > 8)",
        functools.partial(
            compile_case,
            triton_mamba_step._conv_step_kernel,
            {"Window": bf, "Xbc": bf, "ConvW": bf, "ConvB": bf, "Out": bf},
            dict(WIDTH=4, WP=4, BLOCK_B=triton_mamba_step.CONV_BLOCK_B, BLOCK_C=triton_mamba_step.CONV_BLOCK_C),
            (),
            4,
        ),
    )
    yield (
        "qkv + rope + cache write",
        functools.partial(
            compile_case,
            triton_gemv._qkv_rope_kernel,
            {"X": bf, "NormW": bf, "W": bf, "Cos": f32, "Sin": f32, "Q": bf, "Kc": bf, "Vc": bf, "Pos": "*i64"},
            dict(BB=1, B=1, GDC=True, BN=4, BK=1024),
            ("eps",),
            2,
        ),
    )
    attn_ptrs = {"Q": bf, "K": bf, "V": bf, "Length": "*i64", "Acc": f32, "M": f32, "L": f32}
    for block, stages in [(64, 2), (128, 3)]:
        yield (
            f"attention split pass (BLOCK {block}, {stages} stages)",
            functools.partial(
                compile_case,
                triton_decode._partial_kernel,
                attn_ptrs,
                dict(D=128, BLOCK_G=16, PRECISION="tf32", DYNAMIC_BOUND=True, STATIC_SPAN=0, GDC=True, BLOCK=block),
                ("scale",),
                4,
                stages,
            ),
        )
    yield (
        "attention merge",
        functools.partial(
            compile_case,
            triton_decode._merge_kernel,
            {"Acc": f32, "M": f32, "L": f32, "Out": bf},
            dict(D=128, BLOCK_S=16, GDC=True),
        ),
    )
    from avengers.decode.kernels import gluon_chain as gc
    from avengers.decode.kernels.gluon_step import LlamaStepKernel

    desc = f"tensordesc<bf16[{gc.ROWS},{gc.CHUNKS},{gc.CW}],{gc.box_layout()!r}>"
    chain_types = {
        "w_d": desc,
        "w2_d": desc,
        "X": bf,
        "Qkv": bf,
        "H2": bf,
        "A": bf,
        "Count": "*i32",
        "LnW": bf,
        "FfLnW": bf,
        "eps": "fp32",
        "Stamps": "*i64",
        "Rope": f32,
        "q_scale": "fp32",
        "Pos": "*i64",
        "Tok": "*i64",
        "K0": bf,
        "V0": bf,
        "KOff": "*i64",
        "VOff": "*i64",
        "Attn": bf,
        "PAcc": f32,
        "PM": f32,
        "PL": f32,
        "k_d": desc,
        "v_d": desc,
        "h_d": desc,
        "Logits": bf,
        "DecNormW": bf,
        "head_eps": "fp32",
        "Emb": bf,
    }
    for warps in (4, 8) if gc.GLUON_API else ():  # written for Triton 3.6's Gluon
        yield (
            f"gluon GEMV chain ({warps} consumer warps)",
            functools.partial(
                compile_gluon_case,
                gc.chain_kernel,
                chain_types,
                dict(
                    STAGES=12,
                    num_warps=warps,
                    STAMPS=warps == 8,
                    DECODE=False,
                ),
                warps,
                ("NQKV", "D", "HID"),
            ),
        )
    step_types = {**chain_types, **{n: "*i32" for n in ("X", "Qkv", "H2", "A", "Attn")}}  # rows as int32 words (_put)
    for g, ring in [(2, True), (4, True), (2, False)] if gc.GLUON_API else ():
        yield (
            (
                f"gluon decode step ({g} query heads per kv head, keys and values "
                f"{'through the ring' if ring else 'loaded by the consumer'})"
            ),
            functools.partial(
                compile_gluon_case,
                gc.chain_kernel,
                step_types,
                dict(
                    STAGES=LlamaStepKernel.STAGES,
                    num_warps=LlamaStepKernel.NUM_WARPS,
                    STAMPS=False,
                    DECODE=True,
                    G=g,
                    HD=128,
                    BLOCK_S=16,
                    KV_RING=ring,
                    INFLIGHT=LlamaStepKernel.INFLIGHT,
                ),
                LlamaStepKernel.NUM_WARPS,
                ("NQKV", "D", "HID", "NQ", "NK", "skh", "skn", "SPLIT", "S", "V"),
            ),
        )
    from avengers.models.mamba import ssd_step_triton

    for state, a_log in ((bf, False), (f32, False), (bf, True)):
        yield (
            f"Mamba-2 decode state update ({state[1:]} state{', A from A_log' if a_log else ''})",
            functools.partial(
                compile_case,
                ssd_step_triton._state_update_kernel,
                {n: bf for n in ("X", "Dt", "B", "C", "Y")} | {"State": state, "DtBias": f32, "A": f32, "D": f32},
                dict(BLOCK_P=ssd_step_triton.BLOCK_P, BLOCK_N=128, HAS_D=True, A_LOG=a_log),
                (),
                ssd_step_triton.NUM_WARPS,
            ),
        )
    from avengers.decode.kernels import triton_tele_readout

    for slots, (precision, warps) in (
        (bf, triton_tele_readout.HALF_SLOTS),
        (f32, triton_tele_readout.FP32_SLOTS),
    ):
        yield (
            f"telescoping slot read-out (tele128_llama3_1.8b, {slots[1:]} slots)",
            functools.partial(
                compile_case,
                triton_tele_readout._readout_kernel,
                {"Q": slots, "K": slots, "V": slots, "W": f32, "KGain": bf, "VGain": bf, "Out": slots},
                dict(
                    HKV=2,
                    G=16,
                    HD=64,
                    BLOCK_C=128,
                    BLOCK_G=16,
                    KV_NORM=True,
                    SOFTCAP=False,
                    MASK_EMPTY=False,
                    PRECISION=precision,
                ),
                ("softcap",),
                warps,
            ),
        )
    from avengers.decode.kernels import triton_tele_update

    for gate in (True, False):
        yield (
            f"telescoping ring update, batch 1 ({'linear' if gate else 'WISQ'} gate)",
            functools.partial(
                compile_case,
                triton_tele_update._ring_update_kernel,
                {"QKV": bf, "Hin": bf, "LnW": bf, "GateW": bf, "InvFreq": f32, "Pos": "*i64", "K": bf, "V": bf}
                | {"W": f32, "Ring": "*i64", "RingNew": "*i64", "RingFused": "*i64", "RingMerge": "*u8", "Qout": bf},
                dict(H=32, HKV=2, HD=64, LEVELS=7, BLOCK_D=1024, BLOCK_G=16, HAS_GATE=gate),
                ("ln_eps",),
                triton_tele_update.NUM_WARPS,
            ),
        )
    fwd, bwd = causal_conv_triton.FWD_TILES, causal_conv_triton.BWD_TILES
    yield (
        "causal conv forward",
        functools.partial(
            compile_case,
            causal_conv_triton._fwd_kernel,
            {"X": bf, "Wt": bf, "Bias": bf, "Out": bf},
            dict(WIDTH=4, HAS_BIAS=True, SILU=True, BT=fwd.bt, BC=fwd.bc),
            num_warps=fwd.warps,
        ),
    )
    yield (
        "causal conv backward",
        functools.partial(
            compile_case,
            causal_conv_triton._bwd_kernel,
            {"X": bf, "W4": bf, "Bias": bf, "G": bf, "DX": bf, "DWp": f32, "DBp": f32},
            dict(HAS_BIAS=True, SILU=True, BT=bwd.bt, NT=bwd.nt, BC=bwd.bc),
            num_warps=bwd.warps,
        ),
    )


def resource_usage(kernel) -> dict:
    """{"registers", "stack_bytes"} of a compiled kernel's cubin (None each without cuobjdump)."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia

    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    found = {}
    if tool.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        found = dict(re.findall(r"\b(REG|STACK):(\d+)", out))
    return {
        "registers": int(found["REG"]) if "REG" in found else None,
        "stack_bytes": int(found["STACK"]) if "STACK" in found else None,
    }


LOOP_OPS = {
    "spill_loads": "LDL",
    "spill_stores": "STL",
    "global_loads": "LDG",
    "shared_loads": "LDS",
    "cta_barriers": "BAR.SYNC",
    "shuffles": "SHFL",
    "exp2": "MUFU.EX2",
    "ffma": "FFMA",
}


def loops(kernel) -> list[dict]:
    """Every backward branch in a compiled kernel's SASS as a loop body: its instruction count and
    how many of them are each of LOOP_OPS, i.e. where spills, barriers and loads sit (the body of
    an outer loop includes its inner loops)."""
    return [
        {"instructions": len(body), **{k: sum(op in b for b in body) for k, op in LOOP_OPS.items()}}
        for body in _loop_bodies(kernel)
    ]


def _loop_bodies(kernel) -> list[list[str]]:
    """The SASS (nvdisasm, shipped with Triton) of every backward branch's loop body."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "nvdisasm"
        sass = subprocess.run([str(tool), "-c", f.name], capture_output=True, text=True, check=True).stdout
    code, labels = [], {}  # instructions in order; label -> index of the instruction after it
    for line in sass.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(code)
        elif re.search(r"/\*[0-9a-f]{4,}\*/", line):
            code.append(line)
    found = []
    for end, line in enumerate(code):
        m = re.search(r"BRA\b.*?(L_x_\d+)", line)
        if m and labels.get(m.group(1), end + 1) <= end:
            found.append(code[labels[m.group(1)] : end + 1])
    return found


def main() -> int:
    import argparse

    from triton.backends import backends

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loops", metavar="NAME", help="also list the loops of the cases whose name contains NAME")
    args = ap.parse_args()

    if "nvidia" not in backends:
        print(
            json.dumps({"case": "backend", "ok": False, "error": f"triton has no nvidia backend: {sorted(backends)}"})
        )
        return 3
    failed = 0
    for name, run in cases():
        try:
            kernel = run()
            print(json.dumps({"case": name, "ok": True, "error": "", **resource_usage(kernel)}), flush=True)
            if args.loops and args.loops in name:
                for loop in loops(kernel):
                    print(json.dumps({"case": name, "loop": loop}), flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, then fail
            failed += 1
            msg = str(e).strip().splitlines()
            print(
                json.dumps({"case": name, "ok": False, "error": f"{type(e).__name__}: {' | '.join(msg[-6:])}"}),
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
