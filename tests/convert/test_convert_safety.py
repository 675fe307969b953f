"""``v2pe-convert`` refuses early, fails clearly and never loses a user's files (in this process,
through the CLI's ``main``; one slow test starts ranks):

- a ``--tp/--pp`` that cannot split the model is refused before any rank starts (exit 2, one line);
- ``--out`` that is, is inside or contains an input (links resolved; also the ``<out>.tmp`` the
  converter clears) is refused in both directions, and the input stays as it was;
- a damaged HF folder (random bytes, a truncated shard, an index naming a tensor its shard lacks,
  broken JSON) is named by file (and tensor), exit 2;
- NaN and Inf weights alike are refused, naming the tensor and the count (import, ``hf.load``, export);
- a failed import or export (a full disk, a NaN found while writing) leaves no ``<out>.tmp``;
- ``export-hf`` needs a tokenizer that belongs to the model, and its output imports back;
- ``--verify`` checks the output before it is published: a failed verify leaves nothing (and an
  existing ``--out`` unchanged).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from v2pe_megatron.cli.convert import main
from v2pe_megatron.convert.errors import HFCheckpointError
from v2pe_megatron.convert.safetensors_io import SafetensorsReader, read_safetensors
from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config

NAN = "language_model.model.layers.1.feed_forward.w1.weight"
INF = "vision_model.encoder.layers.0.mlp.fc1.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An HF folder and its import (module-wide: read only by the tests)."""
    from v2pe_megatron.convert.megatron import import_hf

    d = tmp_path_factory.mktemp("made")
    remote_checkpoint(str(d / "hf"), tiny_model_config())
    import_hf(d / "hf", d / "ck", progress=False)
    return d


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _planted(src: Path, dst: Path, change) -> Path:
    """A copy of the HF folder ``src`` with its tensors changed by ``change``, in one shard."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    for f in ("config.json", "added_tokens.json"):
        shutil.copy(src / f, dst / f)
    sd = read_safetensors(src)
    change(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("v2pe-convert: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- item 4: layout first
def test_a_layout_that_cannot_split_the_model_is_refused_before_any_rank_starts(made, tmp_path, monkeypatch, capsys):
    import v2pe_megatron.runtime.launch as launch

    def no_ranks(*a, **k):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(launch, "run_local", no_ranks)
    base = ["import-hf", "--hf", str(made / "hf"), "--out", str(tmp_path / "ck"), "--no-progress"]
    assert main(base + ["--tp", "3"]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert "--tp 3 --pp 1 cannot split the model" in line and "num_attention_heads=4" in line, line
    assert "This model takes --tp 1, 2 and --pp 1, 2, 4" in line, line
    assert "starting" not in captured.out
    assert main(base + ["--tp", "2", "--pp", "3"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "parallel.pp=3 must divide model.language.num_layers=4" in line, line
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.tmp").exists()


# --------------------------------------------------------------------------- item 10: inputs are safe
def test_out_that_is_inside_or_contains_an_input_is_refused_and_the_input_survives(made, tmp_path, capsys):
    area = tmp_path / "area"
    hf = _copy(made / "hf", area / "hf")
    ck = _copy(made / "ck", area / "ck")
    (area / "recipe.yaml").write_text((ck / "model.yaml").read_text())
    os.symlink(hf, tmp_path / "hf_link")
    before = _snapshot(area)
    imp = ["import-hf", "--hf", str(hf), "--no-progress", "--force", "--out"]
    exp = ["export-hf", "--ckpt", str(ck), "--layout", "remote-code", "--tokenizer", str(hf), "--no-progress",
           "--force", "--out"]
    cases = [
        (imp + [str(hf)], "is --hf"),                                # replaced by the import of itself
        (imp + [str(tmp_path / "hf_link")], "is --hf"),              # the same, through a link
        (imp + [str(hf / "ck")], "is inside --hf"),
        (imp + [str(area)], "contains --hf"),                        # --force would delete the source
        (imp + [str(tmp_path / "free")], None),                      # control: a free --out is accepted
        (exp + [str(ck)], "is --ckpt"),
        (exp + [str(ck / "hf")], "is inside --ckpt"),
        (exp + [str(hf)], "is --tokenizer"),                         # the HF folder the model came from
        (exp[:-2] + ["--model-yaml", str(area / "recipe.yaml"), "--force", "--out", str(area)], "contains --ckpt"),
    ]
    for argv, how in cases:
        code = main(argv)
        err = capsys.readouterr().err
        if how is None:
            assert code == 0, err
            continue
        assert code == 2, (argv, err)
        line = _one_line(err)
        assert how in line and "would destroy its input" in line, line
        assert _snapshot(area) == before, argv
    # the staging folder <out>.tmp, which the converter clears first, is an input too
    staged_src = _copy(made / "hf", tmp_path / "model.tmp")
    assert main(["import-hf", "--hf", str(staged_src), "--out", str(tmp_path / "model"), "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.tmp (the folder --out" in line and "is --hf" in line, line
    assert _snapshot(staged_src) == _snapshot(made / "hf")
    # an --out that cannot be written is found before the work, not when the first file is written
    (tmp_path / "afile").write_text("x")
    assert main(["import-hf", "--hf", str(hf), "--out", str(tmp_path / "afile" / "ck"), "--no-progress"]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in _one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- damaged HF folders
def test_a_damaged_hf_folder_is_named_by_file_and_tensor(made, tmp_path, capsys):
    shard = "model-00001-of-00002.safetensors"

    def damaged(name: str, change) -> Path:
        d = _copy(made / "hf", tmp_path / name)
        change(d)
        return d

    g = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    rnd = damaged("random", lambda d: (d / shard).write_bytes(b"\xff" * 8 + noise))  # OverflowError before
    with pytest.raises(HFCheckpointError, match=rf"{rnd / shard} is not a readable safetensors file: .*header of "):
        SafetensorsReader(rnd)
    short = damaged("truncated", lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:-100]))
    with pytest.raises(HFCheckpointError, match=rf"{short / shard} is truncated: tensor \S+ ends at data byte"):
        SafetensorsReader(short)

    def index_names_a_stranger(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["mlp1.9.weight"] = shard
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))

    stranger = damaged("index", index_names_a_stranger)  # a bare KeyError before
    with pytest.raises(HFCheckpointError, match=rf"{stranger / shard} has no tensor mlp1.9.weight, which "
                                                rf"model.safetensors.index.json places there"):
        SafetensorsReader(stranger)
    bad_index = damaged("badindex", lambda d: (d / "model.safetensors.index.json").write_text("{"))
    with pytest.raises(HFCheckpointError, match=r"model.safetensors.index.json is damaged"):
        SafetensorsReader(bad_index)
    for folder, says in ((rnd, str(rnd / shard)), (stranger, "mlp1.9.weight")):
        assert main(["import-hf", "--hf", str(folder), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert says in _one_line(capsys.readouterr().err)
    bad_cfg = damaged("badcfg", lambda d: (d / "config.json").write_text('{"llm_config": '))
    assert main(["import-hf", "--hf", str(bad_cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{bad_cfg / 'config.json'} is not valid JSON" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


# --------------------------------------------------------------------------- non-finite weights
@pytest.mark.slow  # whole conversions (1-2 s each)
def test_nan_and_inf_weights_are_refused_alike_naming_the_tensor_and_the_count(made, tmp_path, monkeypatch, capsys):
    import v2pe_megatron.convert.megatron as conv
    from v2pe_megatron import hf as hf_api
    from v2pe_megatron.convert.megatron import export_hf, import_hf

    def plant(sd):
        sd[INF].view(-1)[3:5] = float("inf")
        sd[INF].view(-1)[9] = -float("inf")

    inf = _planted(made / "hf", tmp_path / "inf", plant)
    n = read_safetensors(inf)[INF].numel()
    # accepted before: only NaN was looked for
    with pytest.raises(HFCheckpointError, match=rf"HF tensor {INF} \(in {inf / 'model.safetensors'}, for megatron "
                                                rf"parameter .*linear_fc1.weight\) holds 3 Inf values of {n}"):
        import_hf(inf, tmp_path / "ck_inf", progress=False)
    assert not (tmp_path / "ck_inf").exists() and not (tmp_path / "ck_inf.tmp").exists()
    with pytest.raises(HFCheckpointError, match=rf"HF tensor {INF} .*holds 3 Inf values"):
        hf_api.hf_to_megatron(hf_api.weight_map(tiny_model_config(), "remote"), read_safetensors(inf))

    def both(sd):
        plant(sd)
        sd[NAN].view(-1)[7] = float("nan")

    nan = _planted(made / "hf", tmp_path / "nan", both)
    assert main(["import-hf", "--hf", str(nan), "--out", str(tmp_path / "ck_nan"), "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "holds 1 NaN value of" in line or "holds 3 Inf values" in line, line  # the first one reached

    # export: a checkpoint with Inf weights (written with the check switched off) is refused too
    monkeypatch.setattr(conv, "nonfinite", lambda t: None)
    import_hf(inf, tmp_path / "ck_bad", progress=False)
    monkeypatch.undo()
    with pytest.raises(HFCheckpointError, match=r"checkpoint tensor vision_model.decoder.layers.mlp.linear_fc1.weight "
                                                rf"\(layer 0\) in .* holds 3 Inf values of {n} \(HF tensor {INF}\)"):
        export_hf(tmp_path / "ck_bad", tmp_path / "out", layout="remote-code", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


# --------------------------------------------------------------------------- failures leave nothing
@pytest.mark.slow  # whole conversions (1-2 s each)
def test_a_full_disk_is_named_and_leaves_no_partial_output(made, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    import v2pe_megatron.convert.megatron as conv

    real, calls = conv._Producer._build, []

    def fills_the_disk(self, g):
        calls.append(g)
        if len(calls) == 5:  # some tensors are on disk by now
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "ck.tmp" / "__0_0.distcp"))
        return real(self, g)

    monkeypatch.setattr(conv._Producer, "_build", fills_the_disk)
    assert main(["import-hf", "--hf", str(made / "hf"), "--out", str(tmp_path / "ck"), "--no-progress"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "writing" in line and "the disk is full" in line and "No space left on device" in line, line
    assert "GB free" in line and f"Nothing was written to {tmp_path / 'ck'}" in line, line
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.tmp").exists()
    monkeypatch.undo()

    # export: safetensors reports the failed write as SafetensorError("... (os error 28)") (its
    # message for a failed write, seen with RLIMIT_FSIZE: "I/O error: File too large (os error 27)")
    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    assert main(["export-hf", "--ckpt", str(made / "ck"), "--out", str(tmp_path / "out"), "--layout", "remote-code",
                 "--tokenizer", str(made / "hf"), "--no-progress", "--force"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "the disk is full" in line and "(the existing one is unchanged)" in line, line
    assert not (tmp_path / "out.tmp").exists() and (tmp_path / "out" / "mine.txt").read_text() == "kept"


# --------------------------------------------------------------------------- export: a loadable folder
@pytest.mark.slow  # whole conversions (1-2 s each)
def test_export_needs_the_models_tokenizer_and_its_output_imports_back(made, tmp_path, capsys):
    exp = ["export-hf", "--ckpt", str(made / "ck"), "--layout", "remote-code", "--no-progress", "--out"]
    assert main(exp + [str(tmp_path / "out")]) == 2  # no --tokenizer: a folder nobody could load
    assert "export-hf needs --tokenizer DIR" in _one_line(capsys.readouterr().err)
    no_ctx = _copy(made / "hf", tmp_path / "tok_no_ctx")
    (no_ctx / "added_tokens.json").write_text(json.dumps({"<img>": 5, "</img>": 6}))
    assert main(exp + [str(tmp_path / "out"), "--tokenizer", str(no_ctx)]) == 2
    assert "does not list the <IMG_CONTEXT> token" in _one_line(capsys.readouterr().err)
    other = _copy(made / "hf", tmp_path / "tok_other")
    (other / "added_tokens.json").write_text(json.dumps({"<img>": 5, "</img>": 6, "<IMG_CONTEXT>": 9}))
    assert main(exp + [str(tmp_path / "out"), "--tokenizer", str(other)]) == 2
    assert "gives <IMG_CONTEXT> the id 9, the model" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()

    assert main(exp + [str(tmp_path / "out"), "--tokenizer", str(made / "hf")]) == 0
    assert main(["import-hf", "--hf", str(tmp_path / "out"), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    a, b = (SafetensorsReader(p) for p in (made / "hf", tmp_path / "out"))
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


@pytest.mark.slow  # whole conversions (1-2 s each)
def test_a_failed_verify_publishes_nothing_and_keeps_the_old_output(made, tmp_path, monkeypatch, capsys):
    """verify_pair (its own tests prove the comparison) is handed the staged folder, complete, while
    --out is still the old one; when it fails, nothing is published."""
    import v2pe_megatron.convert.verify as verify
    from v2pe_megatron.convert.errors import VerifyError

    seen = []

    def differs(hf_dir, ckpt, *, layout):
        staged = Path(ckpt if str(ckpt).endswith(".tmp") else hf_dir)
        seen.append(staged.name)
        assert staged.is_dir() and (staged / ("manifest.json" if staged == Path(ckpt) else "config.json")).is_file()
        assert not (tmp_path / "ck").exists() and (tmp_path / "out" / "mine.txt").is_file()
        raise VerifyError(f"verify: max relative logits difference 0.5 > 0.0001 (top-1 agreement 0.2500) "
                          f"between {hf_dir} and {ckpt}")

    monkeypatch.setattr(verify, "verify_pair", differs)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    assert main(["export-hf", "--ckpt", str(made / "ck"), "--out", str(tmp_path / "out"), "--layout", "remote-code",
                 "--tokenizer", str(made / "hf"), "--no-progress", "--force", "--verify"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "verify: max relative logits difference 0.5" in line, line
    assert f"nothing was written to {tmp_path / 'out'}" in line, line
    assert (tmp_path / "out" / "mine.txt").read_text() == "kept" and len(os.listdir(tmp_path / "out")) == 1
    assert not (tmp_path / "out.tmp").exists()
    assert main(["import-hf", "--hf", str(made / "hf"), "--out", str(tmp_path / "ck"), "--no-progress",
                 "--verify"]) == 1
    assert f"nothing was written to {tmp_path / 'ck'}" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.tmp").exists()
    assert seen == ["out.tmp", "ck.tmp"]


# --------------------------------------------------------------------------- ranks
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_import_on_ranks_that_fails_says_it_once_and_leaves_nothing(made, tmp_path, capfd):
    """tp=2: the NaN one rank finds while writing reaches both ranks, rank 0 says it, and the
    staging folder is gone. (A clean import on ranks, published by this process after --verify:
    test_convert_cli's tp=2 x pp=2 test.)"""
    nan = _planted(made / "hf", tmp_path / "nan", lambda sd: sd[NAN].view(-1)[7:8].fill_(float("nan")))
    assert main(["import-hf", "--hf", str(nan), "--out", str(tmp_path / "ck"), "--tp", "2", "--no-progress"]) == 2
    err = capfd.readouterr().err
    said = [ln for ln in err.splitlines() if ln.startswith("v2pe-convert: ")]
    assert len(said) == 1 and f"HF tensor {NAN}" in said[0] and "holds 1 NaN value of" in said[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.tmp").exists()
