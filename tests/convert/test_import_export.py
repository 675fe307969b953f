"""One-process import and export (remote-code layout, the tiny preset's InternLM2 shapes): bit-exact
round trip, the files beside the checkpoint, atomic output, and the coverage checks naming a planted
missing and a planted extra tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch

from v2pe_megatron.convert.errors import HFCheckpointError
from v2pe_megatron.convert.megatron import export_hf, import_hf, read_model_yaml
from v2pe_megatron.convert.safetensors_io import read_safetensors

from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config
from v2pe_megatron.training.checkpointing import ModelMismatch


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    stride = {"rope_pos_id_version": "v2pe_fix", "rope_pos_id_stride": 16}
    tensors = remote_checkpoint(str(d / "hf"), tiny_model_config(), extra_config=stride)
    return d, tensors


@pytest.mark.slow  # whole conversions (1-2 s each)
def test_round_trip_is_bit_exact_and_model_yaml_is_the_recipe_section(remote):
    d, tensors = remote
    res = import_hf(d / "hf", d / "ck", progress=False)
    assert res.layout == "remote" and res.tensors == len(tensors)
    assert not (d / "ck.tmp").exists() and (d / "ck" / "manifest.json").is_file()
    mc = read_model_yaml(d / "ck" / "model.yaml")
    want = tiny_model_config()
    assert (mc.vision, mc.language, mc.img_context_token_id) == (want.vision, want.language, want.img_context_token_id)
    from v2pe_megatron.config import load_recipe

    assert load_recipe(d / "ck" / "model.yaml").v2pe.delta == 16 / 256  # the source's V2PE setting

    export_hf(d / "ck", d / "out", layout="remote-code", max_shard_bytes=1 << 16, progress=False)
    back = read_safetensors(d / "out")
    assert set(back) == set(tensors)
    bad = [k for k in tensors if not torch.equal(back[k], tensors[k])]
    assert not bad, bad
    assert len([f for f in os.listdir(d / "out") if f.endswith(".safetensors")]) > 1
    cfg = json.loads((d / "out" / "config.json").read_text())
    src = json.loads((d / "hf" / "config.json").read_text())
    assert cfg == src  # every key, V2PE ones included, survives the round trip

    with pytest.raises(FileExistsError, match="--force"):
        export_hf(d / "ck", d / "out", layout="remote-code", progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        import_hf(d / "hf", d / "ck", progress=False)
    (d / "empty").mkdir()
    with pytest.raises(HFCheckpointError, match="holds no tokenizer files"):  # found before the weights
        export_hf(d / "ck", d / "out2", layout="remote-code", tokenizer=d / "empty", progress=False)
    assert not (d / "out2").exists() and not (d / "out2.tmp").exists()
    # a model section that does not describe the checkpoint is named before anything is read
    wrong = (d / "ck" / "model.yaml").read_text().replace("num_layers: 4", "num_layers: 3")
    (d / "wrong.yaml").write_text(wrong)
    with pytest.raises(ModelMismatch, match=r"model\.language\.num_layers is 4 there, 3 in --model-yaml "):
        export_hf(d / "ck", d / "out3", layout="remote-code", model_yaml=d / "wrong.yaml", progress=False)
    assert not (d / "out3").exists() and not (d / "out3.tmp").exists()


def _planted(src, dst, change):
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "added_tokens.json"):
        with open(os.path.join(src, f)) as a, open(os.path.join(dst, f), "w") as b:
            b.write(a.read())
    sd = read_safetensors(src)
    change(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))


@pytest.mark.slow  # whole conversions (1-2 s each)
def test_coverage_names_a_missing_an_extra_and_a_misshaped_tensor(remote):
    d, _ = remote
    missing = "language_model.model.layers.2.feed_forward.w3.weight"
    _planted(d / "hf", d / "missing", lambda sd: sd.pop(missing))
    with pytest.raises(HFCheckpointError, match=f"HF tensor {missing} .*is missing"):
        import_hf(d / "missing", d / "ck_missing", progress=False)
    extra = "language_model.model.layers.9.attention.wo.weight"
    _planted(d / "hf", d / "extra", lambda sd: sd.__setitem__(extra, torch.zeros(2)))
    with pytest.raises(HFCheckpointError, match=f"unexpected HF tensor {extra}"):
        import_hf(d / "extra", d / "ck_extra", progress=False)
    wrong = "vision_model.encoder.layers.1.attn.qkv.weight"
    _planted(d / "hf", d / "shape", lambda sd: sd.__setitem__(wrong, torch.zeros(192, 63)))
    with pytest.raises(HFCheckpointError, match=rf"{wrong} has shape \(192, 63\).*\(192, 64\)"):
        import_hf(d / "shape", d / "ck_shape", progress=False)
    # the data is read while megatron's save writes it: a NaN is found there, and nothing is published
    # (nor left behind: the staging folder goes too)
    nan = "language_model.model.layers.1.feed_forward.w1.weight"
    _planted(d / "hf", d / "nan", lambda sd: sd[nan].view(-1)[7:8].fill_(float("nan")))
    with pytest.raises(HFCheckpointError, match=rf"HF tensor {nan} \(in {d / 'nan' / 'model.safetensors'}, for "
                                                rf"megatron parameter language_model.decoder.layers.1.mlp.linear_fc1"
                                                rf".weight\) holds 1 NaN value of 8192"):
        import_hf(d / "nan", d / "ck_nan", progress=False)
    assert not any((d / f"ck_{c}{t}").exists() for c in ("missing", "extra", "shape", "nan") for t in ("", ".tmp"))


@pytest.mark.slow  # whole conversions (1-2 s each)
def test_internvl2_1b_style_remote_qwen2_with_tied_embeddings_round_trips(tmp_path):
    """Remote-code layout with a Qwen2 LLM (qkv bias, GQA) and tied embeddings, as InternVL2-1B."""
    import dataclasses

    mc = tiny_model_config()
    mc.language = dataclasses.replace(mc.language, arch="qwen2", qkv_bias=True, tie_word_embeddings=True,
                                      num_layers=2)
    tensors = remote_checkpoint(str(tmp_path / "hf"), mc, seed=1)
    assert "language_model.model.layers.1.self_attn.k_proj.bias" in tensors
    assert not any(k.startswith("language_model.lm_head") for k in tensors)
    import_hf(tmp_path / "hf", tmp_path / "ck", progress=False)
    export_hf(tmp_path / "ck", tmp_path / "out", layout="remote-code", progress=False)
    back = read_safetensors(tmp_path / "out")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())


def test_import_without_tokenizer_files_names_them_and_takes_the_id_from_the_flag(tmp_path, capsys):
    """A folder whose tokenizer files are missing (or do not list <IMG_CONTEXT>): the error names the
    files it looked for and the flag (exit 2: bad input, nothing written); ``--img-context-token-id``
    supplies the id."""
    from v2pe_megatron.cli.convert import main

    mc = tiny_model_config()
    hf = tmp_path / "hf"
    remote_checkpoint(str(hf), mc)
    (hf / "added_tokens.json").unlink()
    assert main(["import-hf", "--hf", str(hf), "--out", str(tmp_path / "ck"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of tokenizer.json, added_tokens.json, tokenizer_config.json is in the folder" in err, err
    assert "--img-context-token-id N (v2pe-convert import-hf)" in err, err
    (hf / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    assert main(["import-hf", "--hf", str(hf), "--out", str(tmp_path / "ck"), "--no-progress"]) == 2
    assert "tokenizer_config.json does not list it" in capsys.readouterr().err
    bad = ["import-hf", "--hf", str(hf), "--out", str(tmp_path / "ck"), "--no-progress", "--img-context-token-id"]
    assert main([*bad, "-1"]) == 2
    assert main([*bad, str(mc.language.vocab_size)]) == 2
    assert f"not a token id of this model (vocabulary {mc.language.vocab_size})" in capsys.readouterr().err
    assert main([*bad, str(mc.img_context_token_id)]) == 0
    assert read_model_yaml(tmp_path / "ck" / "model.yaml").img_context_token_id == mc.img_context_token_id
