"""``v2pe-convert`` end to end (subprocesses and gloo ranks; 2-3 min on 2 busy cores).

- transformers-native layout (Qwen2, odd vocabulary so TP pads it): imported at TP=2 x PP=2 on 4
  ranks with ``--verify`` (transformers' own forward against the checkpoint loaded at TP=1), exported
  back bit-exactly, also from the other key spelling;
- remote-code layout (InternLM2, the tiny preset): a converted checkpoint trains a step with
  ``v2pe-train`` at TP=2 (learning rate 0, so the weights stay put), its step-1 loss equals
  ``hf.load``'s loss on the same batch, and the training checkpoint (saved at TP=2) exports back to
  the original tensors bit-exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from v2pe_megatron.convert.safetensors_io import read_safetensors
from v2pe_megatron.testing.distributed import run_distributed

from v2pe_megatron.testing.hf_fixtures import native_checkpoint, remote_checkpoint, tiny_model_config

ROOT = Path(__file__).resolve().parents[2]


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "v2pe_megatron.cli.convert", *args, "--no-progress"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=400)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _verified(r: subprocess.CompletedProcess) -> tuple[float, float]:
    m = re.search(r"max relative logits difference ([0-9.e+-]+), top-1 agreement ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr[-2000:]
    return float(m.group(1)), float(m.group(2))


def _same(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_native_tp2_pp2_import_matches_transformers_and_exports_bit_exactly(tmp_path, capsys):
    pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    native_checkpoint(str(hf))
    r = convert("import-hf", "--hf", str(hf), "--out", str(tmp_path / "ck"), "--tp", "2", "--pp", "2", "--verify")
    assert "starting 4 ranks" in r.stdout
    rel, top1 = _verified(r)
    assert rel <= 1e-5 and top1 == 1.0, (rel, top1)

    r = convert("export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--layout",
                "transformers", "--tokenizer", str(hf), "--verify")
    assert _verified(r)[0] <= 1e-5
    original = read_safetensors(hf)
    assert not _same(read_safetensors(tmp_path / "out"), original)
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (hf / "tokenizer_config.json").read_text()

    def flat(d, p=""):
        return {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict)
                                                             else [(p + k, v)])}

    src_cfg, out_cfg = (flat(json.loads((f / "config.json").read_text())) for f in (hf, tmp_path / "out"))
    changed = {k: (v, out_cfg.get(k)) for k, v in src_cfg.items() if out_cfg.get(k) != v}
    assert not changed, changed  # every key of transformers' config.json survives, shapes included

    # transformers' runtime key spelling (model.vision_tower.*, lm_head) imports to the same checkpoint
    from safetensors.torch import save_file

    from v2pe_megatron.convert.safetensors_io import canonical_native_names

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    for f in ("config.json", "tokenizer_config.json"):
        (runtime / f).write_text((hf / f).read_text())
    save_file(canonical_native_names(original), str(runtime / "model.safetensors"))
    # in this process from here on: the CLI's library calls and its argument errors
    from v2pe_megatron.cli.convert import main
    from v2pe_megatron.convert.megatron import export_hf, import_hf

    import_hf(runtime, tmp_path / "ck2", progress=False)
    export_hf(tmp_path / "ck2", tmp_path / "out2", layout="transformers", progress=False)
    assert not _same(read_safetensors(tmp_path / "out2"), original)

    out = ["export-hf", "--ckpt", str(tmp_path / "ck"), "--layout", "transformers", "--tokenizer", str(hf),
           "--no-progress", "--out"]
    assert main(out + [str(tmp_path / "out")]) == 2 and "--force" in capsys.readouterr().err
    assert main(out + [str(tmp_path / "o3"), "--v2pe-delta", "0.3"]) == 2
    assert "not an integer stride" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def hf_loss(hf_dir: str, recipe_path: str, world: int) -> float:
    """hf.load's loss on the first global batch the recipe's loader draws (as v2pe-train's step 1)."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from v2pe_megatron import hf
    from v2pe_megatron.config import load_recipe, validate
    from v2pe_megatron.data.loader import build_train_loader
    from v2pe_megatron.training.forward import prepare_batch

    dist.destroy_process_group()
    recipe = load_recipe(recipe_path)
    layout = validate(recipe, world_size=world, spec="local")
    model = hf.load(hf_dir)
    loader = build_train_loader(recipe, dp_rank=0, dp_size=1, pad_multiple=layout.seq_multiple)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for _ in range(recipe.data.global_batch_size // recipe.data.micro_batch_size):
            b = prepare_batch(next(loader), model.layout, torch.device("cpu"), torch.float32,
                              model.img_context_token_id)
            loss = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels,
                         packed_seq_params=b.packed_seq_params, image_feature_index=b.image_feature_index)
            total += float((loss.float() * b.loss_mask).sum())
            count += float(b.loss_mask.sum())
    loader.close()
    return total / count


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_converted_checkpoint_trains_with_hf_loss_and_exports_from_a_tp2_training_checkpoint(tmp_path):
    hf = tmp_path / "hf"
    tensors = remote_checkpoint(str(hf), tiny_model_config(), seed=3)
    convert("import-hf", "--hf", str(hf), "--out", str(tmp_path / "ck"), "--verify")
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny_cpu.yaml").read_text())
    recipe.update(yaml.safe_load((tmp_path / "ck" / "model.yaml").read_text()))  # the user's copy-paste
    recipe.update(name="from_hf", tracking={"backend": "none"})
    recipe["data"]["seq_length"] = 128
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "v2pe_megatron.cli.train", str(tmp_path / "recipe.yaml"), "--nproc", "2",
                        "parallel.tp=2", f"checkpoint.pretrained={tmp_path / 'ck'}", f"checkpoint.dir={tmp_path / 'run'}",
                        "train.steps=1", "checkpoint.save_interval=1", "optimizer.lr=0", "optimizer.weight_decay=0"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loss = float(re.search(r"step 1/1  loss ([0-9.]+)", r.stdout + r.stderr).group(1))
    ref = run_distributed(hf_loss, 1, str(hf), str(tmp_path / "recipe.yaml"), 2, timeout=300)[0]
    assert abs(loss - ref) <= 1e-5 + 1e-9, (loss, ref)  # printed to 5 decimals

    convert("export-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--layout", "remote-code",
            "--model-yaml", str(tmp_path / "recipe.yaml"), "--tokenizer", str(hf))
    assert not _same(read_safetensors(tmp_path / "out"), tensors)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["llm_config"]["num_hidden_layers"] == 4 and cfg["architectures"] == ["InternVLChatModel"]
