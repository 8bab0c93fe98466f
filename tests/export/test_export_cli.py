"""`python -m avengers.export`: dtype names, formats per family, and errors that name the fix and
leave everything already on disk as it was."""

import json

import pytest
import torch
from checkpoint_helpers import save_checkpoint
from safetensors import safe_open

from avengers.export.__main__ import main as export_main
from avengers.models.mamba import from_pretrained


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("llama_run")
    save_checkpoint(run, "llama3_tiny")
    return run


DTYPES = [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp32", torch.float32)]


@pytest.mark.parametrize("name,dtype", DTYPES)
def test_dtype_short_and_long_names(llama_run, tmp_path, name, dtype):
    out = tmp_path / "hf"
    assert export_main(["--ckpt", str(llama_run), "--out", str(out), "--dtype", name]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_mamba_default_format_is_mamba_ssm_and_hf_on_request(tmp_path):
    model = save_checkpoint(tmp_path / "run", "mamba2_tiny")
    assert export_main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "ssm"), "--dtype", "fp32"]) == 0
    loaded = from_pretrained(str(tmp_path / "ssm"))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert export_main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Mamba2ForCausalLM"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dtype", "half"], "--dtype: unknown dtype 'half'; accepted: bf16, bfloat16"),
        (["--format", "mamba_ssm"], "--format mamba_ssm: llama3_tiny (llama) exports to hf"),
    ],
)
def test_bad_arguments_fail_in_one_line(llama_run, tmp_path, capsys, args, message):
    assert export_main(["--ckpt", str(llama_run), "--out", str(tmp_path / "hf"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_missing_checkpoint_and_existing_output_are_refused_untouched(llama_run, tmp_path, capsys):
    assert export_main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main(["--ckpt", str(llama_run), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
