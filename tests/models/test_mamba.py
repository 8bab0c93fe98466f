"""Mamba-2 / hybrid models: mamba_ssm's parameter layout, init, cached decode, save_pretrained folders."""

import json
import math

import pytest
import torch
from decode_helpers import decode_logits, track_compiled

from avengers.decode.cache import KVState
from avengers.decode.mamba import AttentionState, MambaState
from avengers.decode.options import DecodeOptions
from avengers.models import get_model_spec, list_variants
from avengers.models.mamba import (
    MambaBlock,
    MambaConfig,
    MambaLM,
    from_pretrained,
    mamba_flops_per_token,
    matmul_params,
    save_pretrained,
)


def _mamba_layer(i, d, d_in_proj, conv_dim, nheads, d_inner):
    p = f"backbone.layers.{i}.mixer."
    # a module's own parameters come before its submodules' in state_dict order
    return {
        p + "dt_bias": (nheads,),
        p + "A_log": (nheads,),
        p + "D": (nheads,),
        p + "in_proj.weight": (d_in_proj, d),
        p + "conv1d.weight": (conv_dim, 1, 4),
        p + "conv1d.bias": (conv_dim,),
        p + "norm.weight": (d_inner,),
        p + "out_proj.weight": (d, d_inner),
    }


# Written out from mamba_ssm 2.3.x (mixer_seq_simple.py, modules/mamba2.py, mha.py, mlp.py, block.py):
# Mamba2.in_proj = [z, x, B, C, dt] = 2*d_inner + 2*ngroups*d_state + nheads outputs; conv over x|B|C;
# MHA.in_proj = head_dim * (heads + 2 * kv_heads), conv1d only with d_conv > 0; GatedMLP.fc1 = 2 * hidden.
def expected_mamba2_tiny():
    keys = {"backbone.embedding.weight": (4096, 64)}
    for i in range(2):
        keys[f"backbone.layers.{i}.norm.weight"] = (64,)
        keys.update(_mamba_layer(i, 64, 296, 160, 8, 128))
    keys.update({"backbone.norm_f.weight": (64,), "lm_head.weight": (4096, 64)})
    return keys


def expected_hybrid_tiny():
    keys = {"backbone.embedding.weight": (4096, 64)}
    for i in range(4):
        keys[f"backbone.layers.{i}.norm.weight"] = (64,)
        if i in (1, 3):
            p = f"backbone.layers.{i}.mixer."
            keys.update(
                {
                    p + "in_proj.weight": (128, 64),
                    p + "conv1d.weight": (128, 1, 4),
                    p + "conv1d.bias": (128,),
                    p + "out_proj.weight": (64, 64),
                }
            )
        else:
            keys.update(_mamba_layer(i, 64, 296, 160, 8, 128))
        keys.update(
            {
                f"backbone.layers.{i}.norm2.weight": (64,),
                f"backbone.layers.{i}.mlp.fc1.weight": (256, 64),
                f"backbone.layers.{i}.mlp.fc2.weight": (64, 128),
            }
        )
    keys.update({"backbone.norm_f.weight": (64,), "lm_head.weight": (4096, 64)})
    return keys


def expected_mamba_9_8b():
    keys = {"backbone.embedding.weight": (128256, 4096)}
    for i in range(32):
        keys[f"backbone.layers.{i}.norm.weight"] = (4096,)
        if i in (9, 18, 27):
            p = f"backbone.layers.{i}.mixer."
            keys.update({p + "in_proj.weight": (128 * (32 + 16), 4096), p + "out_proj.weight": (4096, 4096)})
        else:
            keys.update(_mamba_layer(i, 4096, 2 * 8192 + 256 + 128, 8192 + 256, 128, 8192))
        keys.update(
            {
                f"backbone.layers.{i}.norm2.weight": (4096,),
                f"backbone.layers.{i}.mlp.fc1.weight": (2 * 14336, 4096),
                f"backbone.layers.{i}.mlp.fc2.weight": (4096, 14336),
            }
        )
    keys.update({"backbone.norm_f.weight": (4096,), "lm_head.weight": (128256, 4096)})
    return keys


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "name,expected",
    [("mamba2_tiny", expected_mamba2_tiny), ("hybrid_tiny", expected_hybrid_tiny), ("mamba_9.8b", expected_mamba_9_8b)],
)
def test_state_dict_matches_mamba_ssm(name, expected):
    model = get_model_spec(name).build("meta")
    got = _shapes(model)
    want = expected()
    assert list(got) == list(want)  # same order too: mamba_ssm's module registration order
    assert got == want


def test_real_configs_shapes_and_sizes():
    sizes = {n: get_model_spec(n).num_params() for n in ("mamba_9.8b", "mamba_2.9b", "mamba_1.5b", "mamba2_1.3b")}
    assert round(sizes["mamba_9.8b"] / 1e9, 2) == 9.78 and round(sizes["mamba_2.9b"] / 1e9, 2) == 2.90
    assert round(sizes["mamba_1.5b"] / 1e9, 2) == 1.50 and round(sizes["mamba2_1.3b"] / 1e9, 2) == 1.50
    m = get_model_spec("mamba_1.5b").build("meta")
    sd = _shapes(m)
    assert sd["backbone.layers.8.mixer.in_proj.weight"] == (128 * 72, 2048)  # MHA: 24 q + 2 * 24 kv heads
    assert sd["backbone.layers.8.mixer.conv1d.weight"] == (128 * 72, 1, 4)
    assert sd["backbone.layers.8.mixer.out_proj.weight"] == (2048, 3072)
    assert m.lm_head.weight is m.backbone.embedding.weight
    for d, n, name in (
        (768, 24, "130m"),
        (1024, 48, "370m"),
        (1536, 48, "780m"),
        (2048, 48, "1.3b"),
        (2560, 64, "2.7b"),
    ):
        cfg = get_model_spec(f"mamba2_{name}").config
        assert (cfg.d_model, cfg.n_layer, cfg.d_state, cfg.headdim, cfg.expand, cfg.d_intermediate) == (
            d,
            n,
            128,
            64,
            2,
            0,
        )
        assert cfg.vocab_size == 128256 and not cfg.attn_layer_idx


def test_variants_registered_with_block_type():
    names = set(list_variants())
    for n in (
        "mamba2_130m",
        "mamba2_370m",
        "mamba2_780m",
        "mamba2_1.3b",
        "mamba2_2.7b",
        "mamba_9.8b",
        "mamba_2.9b",
        "mamba_1.5b",
        "mamba2_tiny",
        "hybrid_tiny",
    ):
        assert n in names
        spec = get_model_spec(n)
        assert spec.family == "mamba" and spec.block_types == (MambaBlock,)
    from avengers.models.llama import TINY_VOCAB

    assert get_model_spec("mamba2_tiny").vocab_size == TINY_VOCAB == get_model_spec("hybrid_tiny").vocab_size


def test_vocab_padding_and_untied_head():
    cfg = MambaConfig(d_model=32, n_layer=1, vocab_size=50277, d_state=8, headdim=16, tie_embeddings=False)
    model = MambaLM(cfg)
    assert model.backbone.embedding.weight.shape == (50288, 32)
    assert model.lm_head.weight is not model.backbone.embedding.weight


def test_init_like_mamba_ssm():
    torch.manual_seed(0)
    cfg = get_model_spec("hybrid_tiny").config
    model = MambaLM(cfg)
    mixer = model.backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= cfg.dt_init_floor * 0.999).all() and (dt <= cfg.dt_max * 1.001).all()
    A = mixer.A_log.exp()
    assert (A >= 1).all() and (A <= 16).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    # default (kaiming-uniform a=sqrt(5)) bound 1/sqrt(fan_in), out_proj/fc2 divided by sqrt(2 * n_layer)
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(2 * cfg.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.8 * bound
    fc2 = model.backbone.layers[0].mlp.fc2.weight
    assert fc2.abs().max() <= 1 / math.sqrt(cfg.mlp_hidden) / math.sqrt(2 * cfg.n_layer)
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002


def test_meta_build_then_init_keeps_tie_and_is_deterministic():
    spec = get_model_spec("hybrid_tiny")
    model = spec.build("meta")
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    assert model.lm_head.weight is model.backbone.embedding.weight
    torch.manual_seed(1)
    other = spec.build("cpu")
    torch.manual_seed(1)
    other.init_weights()
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def _decode_variants():
    hybrid = get_model_spec("hybrid_tiny")
    return {
        "mamba2_tiny": get_model_spec("mamba2_tiny"),
        "hybrid_tiny": hybrid,
        "hybrid_no_conv_no_rope_mha": hybrid.replace(attn_d_conv=0, attn_rotary_emb_dim=0, attn_num_heads_kv=None),
        "hybrid_full_rotary_unfused": hybrid.replace(
            attn_rotary_emb_dim=16, fused_add_norm=False, residual_in_fp32=False
        ),
    }


@pytest.mark.parametrize("name", list(_decode_variants()))
def test_full_forward_equals_prefill_and_decode(name):
    torch.manual_seed(0)
    model = _decode_variants()[name].build("cpu").eval()
    ids = torch.randint(0, 4096, (2, 41))  # > 2 chunks of 16, not a multiple
    with torch.no_grad():
        full = model(ids)
        for splits in ([1] * 41, [19] + [1] * 22, [7, 20, 1, 13]):
            cache = model.allocate_cache(2, 48)
            outs, pos = [], 0
            for n in splits:
                outs.append(model(ids[:, pos : pos + n], cache=cache))
                pos += n
            assert cache.seq_len == 41 and int(cache.position) == 41
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4, msg=f"{name} {splits}")


@pytest.mark.slow
def test_compiled_conv_step_matches_eager_decode(monkeypatch):
    """On the `compile` decode path each Mamba-2 layer's one-token conv runs one torch.compile'd
    conv_step (one graph for every layer and step) and decodes what the reference path does."""
    from avengers.decode import mamba as mamba_decode
    from avengers.models.mamba import Mamba2Mixer

    torch.manual_seed(0)
    model = get_model_spec("hybrid_tiny").build("cpu").eval()  # Mamba-2 layers beside attention
    ids = torch.randint(0, 4096, (2, 24))
    calls, new_graphs = track_compiled(monkeypatch, mamba_decode, "compiled_conv_step")
    outs = {path: decode_logits(model, ids, 8, path) for path in ("reference", "compile")}
    torch.testing.assert_close(outs["compile"], outs["reference"], atol=1e-5, rtol=1e-5)
    mamba_layers = sum(isinstance(layer.mixer, Mamba2Mixer) for layer in model.backbone.layers)
    assert mamba_layers and len(calls) == 16 * mamba_layers
    assert new_graphs() == 1


def test_cache_layers_and_sizes():
    pure = get_model_spec("mamba2_tiny").build("cpu")
    sizes = {n: pure.allocate_cache(3, n).nbytes() for n in (16, 1024, 65536)}
    assert len(set(sizes.values())) == 1  # constant in context length
    cache = pure.allocate_cache(3, 16)
    st = cache.layers[0]
    assert isinstance(st, MambaState) and st.conv.shape == (3, 160, 4) and st.ssm.shape == (3, 8, 16, 16)
    assert st.ssm.dtype == torch.float32
    hybrid = get_model_spec("hybrid_tiny").build("cpu")
    cache = hybrid.allocate_cache(3, 256)
    assert [type(s) for s in cache.layers] == [MambaState, AttentionState, MambaState, AttentionState]
    assert isinstance(cache.layers[1], KVState) and cache.layers[1].k.shape == (3, 2, 256, 16)
    assert pure.allocate_cache(3, 16).nbytes_written_per_step() == sizes[16]  # conv and SSM state rewritten
    written = cache.nbytes_written_per_step()
    mamba_bytes = sum(t.numel() * 4 for s in cache.layers if isinstance(s, MambaState) for t in (s.conv, s.ssm))
    attn = [s for s in cache.layers if isinstance(s, AttentionState)]
    one_position = sum(2 * 3 * s.k.shape[1] * s.k.shape[3] * 4 for s in attn)
    conv_windows = sum(s.conv.numel() * 4 for s in attn if s.conv is not None)
    assert written == mamba_bytes + one_position + conv_windows
    grow = hybrid.allocate_cache(3, 512).nbytes() - cache.nbytes()
    assert grow == 2 * 2 * 3 * 2 * 256 * 16 * 4  # attention layers x (k, v) x B x kv_heads x extra positions x d x fp32


def test_ssm_state_in_the_model_dtype_halves_the_state_and_decodes_alike():
    """DecodeOptions(ssm_state="model"): the SSM state in the model's dtype (as mamba_ssm keeps it),
    updated in fp32 and rounded once per step; in bf16 it decodes what the fp32 state decodes, to
    bf16's rounding, and prefill + decode continue across both."""
    torch.manual_seed(0)
    model = get_model_spec("hybrid_tiny").build("cpu").eval().to(torch.bfloat16)
    ids = torch.randint(0, 4096, (2, 40))
    half = DecodeOptions(ssm_state="model")
    caches = {name: model.allocate_cache(2, 40, options=o) for name, o in (("fp32", None), ("model", half))}
    states = [s for s in caches["model"].layers if isinstance(s, MambaState)]
    assert states and all(s.ssm.dtype == torch.bfloat16 for s in states)
    full_state = sum(s.ssm.numel() for s in states) * 4
    assert caches["fp32"].nbytes() - caches["model"].nbytes() == full_state // 2
    with torch.no_grad():
        full = model(ids).float()
        outs = {
            name: torch.cat(
                [model(ids[:, :16], cache=c)] + [model(ids[:, t : t + 1], cache=c) for t in range(16, 40)], 1
            )
            for name, c in caches.items()
        }
    scale = full.abs().max()
    assert (outs["fp32"].float() - full).abs().max() < 0.05 * scale
    assert (outs["model"].float() - outs["fp32"].float()).abs().max() < 0.05 * scale
    assert not torch.equal(outs["model"], outs["fp32"])  # the state was rounded: not the fp32 path


def test_ssd_step_rounds_a_half_state_once_per_step():
    from avengers.models.mamba.ssd import ssd_step

    torch.manual_seed(0)
    b, h, p, n = 2, 4, 8, 16
    x, dt = torch.randn(b, h, p), torch.rand(b, h)
    A, B, C, D = -torch.rand(h), torch.randn(b, 1, n), torch.randn(b, 1, n), torch.randn(h)
    start = torch.randn(b, h, p, n).to(torch.bfloat16)
    full, half = start.float(), start.clone()
    y_full = ssd_step(full, x, dt, A, B, C, D)
    y_half = ssd_step(half, x, dt, A, B, C, D)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))
    torch.testing.assert_close(y_half, y_full)  # the read-out uses the update before rounding


def test_decode_options_name_a_bad_ssm_state_dtype():
    with pytest.raises(ValueError, match=r"SSM state dtype must be one of \('fp32', 'model'\), got 'bf16'"):
        DecodeOptions(ssm_state="bf16")


def test_cache_errors():
    model = get_model_spec("mamba2_tiny").build("cpu")
    cache = model.allocate_cache(2, 8)
    with pytest.raises(ValueError, match="batch=2"):
        model(torch.zeros(3, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(2, 9, dtype=torch.long), cache=cache)


def test_bf16_params_run():
    model = get_model_spec("hybrid_tiny").build("cpu").to(torch.bfloat16)
    ids = torch.randint(0, 4096, (1, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(1, 20)
        out = torch.cat(
            [model(ids[:, :12], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)], 1
        )
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()
    assert (out.float() - full.float()).abs().max() < 0.1 * full.float().abs().max()


def test_autocast_training_step_has_gradients():
    torch.manual_seed(0)
    model = get_model_spec("hybrid_tiny").build("cpu")
    ids = torch.randint(0, 4096, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert abs(loss.item() - math.log(4096)) < 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = get_model_spec("hybrid_tiny").build("cpu").eval()
    save_pretrained(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    # exactly mamba_ssm's MambaConfig fields, with Mamba2 / MHA keyword arguments inside
    assert set(cfg) == {
        "d_model",
        "d_intermediate",
        "n_layer",
        "vocab_size",
        "ssm_cfg",
        "attn_layer_idx",
        "attn_cfg",
        "rms_norm",
        "residual_in_fp32",
        "fused_add_norm",
        "pad_vocab_size_multiple",
        "tie_embeddings",
    }
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["attn_layer_idx"] == [1, 3]
    assert cfg["attn_cfg"] == {
        "causal": True,
        "num_heads": 4,
        "num_heads_kv": 2,
        "head_dim": 16,
        "rotary_emb_dim": 8,
        "rotary_emb_base": 10000.0,
        "d_conv": 4,
        "qkv_proj_bias": False,
        "out_proj_bias": False,
    }
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_hybrid_tiny()
    loaded = from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    ids = torch.randint(0, 4096, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_load_mamba_ssm_style_folder(tmp_path):
    """A folder as mamba_ssm writes it: minimal config (package defaults), MHA default biases on."""
    cfg = {
        "d_model": 64,
        "d_intermediate": 0,
        "n_layer": 2,
        "vocab_size": 1000,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16},
        "attn_layer_idx": [1],
        "attn_cfg": {"causal": True, "num_heads": 4, "head_dim": 16},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mcfg = MambaConfig.from_mamba_ssm(cfg)
    assert mcfg.attn_qkv_bias and mcfg.attn_out_bias and mcfg.padded_vocab == 1000
    torch.save(MambaLM(mcfg).state_dict(), tmp_path / "pytorch_model.bin")
    model = from_pretrained(str(tmp_path))
    assert model.backbone.layers[1].mixer.in_proj.bias.shape == (16 * 12,)
    minimal = MambaConfig.from_mamba_ssm({"d_model": 768, "n_layer": 24, "ssm_cfg": {"layer": "Mamba2"}})
    assert (minimal.vocab_size, minimal.padded_vocab, minimal.tie_embeddings) == (50277, 50280, True)  # its defaults
    assert (minimal.d_state, minimal.headdim, minimal.chunk_size, minimal.attn_layer_idx) == (128, 64, 256, ())
    bad = dict(cfg, ssm_cfg={"layer": "Mamba1"})
    with pytest.raises(ValueError, match="Mamba2"):
        MambaConfig.from_mamba_ssm(bad)
    with pytest.raises(ValueError, match="not supported"):
        MambaConfig.from_mamba_ssm(dict(cfg, ssm_cfg={"layer": "Mamba2", "norm_before_gate": True}))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(str(tmp_path / "nowhere"))


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="attn_layer_idx"):
        MambaConfig(n_layer=4, attn_layer_idx=(4,))
    with pytest.raises(ValueError, match="attn_num_heads_kv"):
        MambaConfig(n_layer=4, attn_layer_idx=(1,), attn_num_heads=6, attn_num_heads_kv=4)
    with pytest.raises(ValueError, match="attn_rotary_emb_dim"):
        MambaConfig(n_layer=4, attn_layer_idx=(1,), attn_head_dim=64, attn_rotary_emb_dim=80)
    with pytest.raises(ValueError, match="headdim"):
        MambaConfig(d_model=80, headdim=64)
    with pytest.raises(ValueError, match="kernels"):
        MambaConfig(kernels="cuda")


def test_flops_per_token():
    cfg = get_model_spec("mamba2_1.3b").config
    params = get_model_spec("mamba2_1.3b").num_params()
    # matmul params = all params - embedding + head (tied: the head still multiplies) - 1-D params
    one_d = 48 * (2048 + 4352 + 3 * 64 + 4096) + 2048
    assert matmul_params(cfg) == params - one_d
    ssd = 3 * (2 * 256 * (128 + 64 * 64) + 4 * 64 * 64 * 128 + 2 * 64 * 64 * 128 / 256)
    assert mamba_flops_per_token(cfg, 4096) == pytest.approx(6 * matmul_params(cfg) + 48 * ssd)
    hybrid = get_model_spec("mamba_1.5b")
    attn = 12 * 5 * 24 * 128 * 4096
    assert hybrid.flops_per_token(4096) - hybrid.flops_per_token(2048) == pytest.approx(attn / 2)


def test_hybrid_attention_gives_sdpa_unit_stride_inputs(monkeypatch):
    """SDPA's fused kernels need q/k/v with unit stride in head_dim; with a channel-first conv
    output they fall back to the math kernel (a materialised score matrix per attention layer)."""
    import torch.nn.functional as F

    from avengers.models.mamba import model as mamba_model

    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(
        mamba_model.F,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: seen.append([t.stride(-1) for t in (q, k, v)]) or real(q, k, v, **kw),
    )
    model = get_model_spec("hybrid_tiny").build("cpu")
    model.init_weights()
    model(torch.randint(0, 100, (2, 12)))
    assert seen and all(s == [1, 1, 1] for s in seen)
