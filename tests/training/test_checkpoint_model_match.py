"""A checkpoint of another model is refused before any model is built or rank started, by every path
that loads one (issue 22, item 2): ``checkpoint.pretrained`` and a resume with a changed ``model:``
section (``v2pe-train``), ``v2pe-eval --ckpt`` and ``v2pe-convert export-hf``. One message, exit 2,
naming the keys that differ (from the checkpoint's ``model.yaml``) or else the tensors. And the loads
themselves verify what they read and fall back from a damaged ``latest`` as a resume does (item 10).
All in-process: the CLIs' ``main`` with its return code and stderr (slow-marked: each builds
megatron meta models, and the module imports a checkpoint once; ~4 s in all on an idle machine)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from v2pe_megatron.training import checkpointing as ckpt

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny preset's model as ``v2pe-convert import-hf`` writes it (weights, model.yaml, manifest)."""
    from v2pe_megatron.convert.megatron import import_hf
    from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config

    d = tmp_path_factory.mktemp("imported")
    remote_checkpoint(str(d / "hf"), tiny_model_config(), seed=1)
    import_hf(d / "hf", d / "ck", progress=False)
    return d / "ck"


def _training_dir(src: Path, root: Path, iterations=(6,), model_yaml: bool = True) -> Path:
    """A training ``checkpoint.dir`` whose iterations hold ``src``'s weights (as far as a check reads)."""
    for it in iterations:
        d = ckpt.iteration_dir(root, it)
        shutil.copytree(src, d)
        if not model_yaml:
            (d / ckpt.MODEL_YAML).unlink()
            ckpt.write_manifest(d)
        (root / "latest").write_text(str(it))
    return root


@pytest.fixture
def no_run(monkeypatch):
    """Training or evaluating would build a model: here that is a failure."""
    def built(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("v2pe_megatron.training.loop.train", built)
    monkeypatch.setattr("v2pe_megatron.eval.runner.evaluate", built)
    monkeypatch.setattr("v2pe_megatron.runtime.launch.run_local", built)


def _one_message(err: str, prog: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_train_refuses_pretrained_of_another_model(imported, capsys, no_run):
    from v2pe_megatron.cli.train import main

    assert main([TINY, f"checkpoint.pretrained={imported}", "model.language.num_layers=2"]) == 2
    msg = _one_message(capsys.readouterr().err, "v2pe-train")
    # spec differs too (local in the recipe, auto in model.yaml) but changes no tensor: not named
    assert msg == (f"v2pe-train: checkpoint.pretrained={imported} is a checkpoint of another model: "
                   f"model.language.num_layers is 4 there, 2 in the recipe. Set this key as the checkpoint has "
                   f"it ({imported / 'model.yaml'} holds its model section), or use a checkpoint of this model")


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_the_same_model_passes_and_the_load_reads_it(imported):
    """The check's shapes are the loader's: the recipe's own model passes, and its weights load."""
    from v2pe_megatron.config import load_recipe

    recipe = load_recipe(TINY, [f"checkpoint.pretrained={imported}"])
    ckpt.check_recipe_checkpoint(recipe)  # no error
    assert ckpt.check_model_matches(imported, recipe.model, what="x") == imported


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_resume_with_a_changed_model_section_names_the_keys(imported, tmp_path, capsys, no_run):
    from v2pe_megatron.cli.train import main

    run = _training_dir(imported, tmp_path / "run", iterations=(4, 6))
    code = main([TINY, f"checkpoint.dir={run}", "model.vision.hidden_size=128", "model.language.ffn_hidden_size=256"])
    assert code == 2
    msg = _one_message(capsys.readouterr().err, "v2pe-train")
    assert msg.startswith(f"v2pe-train: checkpoint.dir={run} (resuming): {run / 'iter_0000006'} is a checkpoint "
                          f"of another model: model.vision.hidden_size is 64 there, 128 in the recipe; "
                          f"model.language.ffn_hidden_size is 128 there, 256 in the recipe. Set these keys")


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_without_model_yaml_the_tensors_are_named(imported, tmp_path, capsys, no_run):
    from v2pe_megatron.cli.train import main

    run = _training_dir(imported, tmp_path / "run", model_yaml=False)
    assert main([TINY, f"checkpoint.dir={run}", "model.language.num_layers=2"]) == 2
    msg = _one_message(capsys.readouterr().err, "v2pe-train")
    assert "its tensors differ from the recipe's model section: " in msg
    assert "language_model.decoder.layers.self_attention.linear_qkv.weight: (4, 128, 64) in the checkpoint, " \
           "(2, 128, 64) in the model" in msg and "; ... (6 tensors in all)" in msg
    assert "Give the model section (model.preset, model.*) the checkpoint was written with" in msg


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_eval_refuses_a_checkpoint_of_another_model(imported, tmp_path, capsys, no_run):
    from v2pe_megatron.cli.eval import main

    code = main([TINY, "--ckpt", str(imported), "--synth", "--out", str(tmp_path / "e"), "model.language.qkv_bias=true"])
    assert code == 2
    msg = _one_message(capsys.readouterr().err, "v2pe-eval")
    assert msg.startswith(f"v2pe-eval: --ckpt {imported} is a checkpoint of another model: "
                          f"model.language.qkv_bias is False there, True in the recipe")


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_export_refuses_a_model_yaml_of_another_model(imported, tmp_path, capsys):
    from v2pe_megatron.cli.convert import main

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text((imported / "model.yaml").read_text().replace("num_query_groups: 2", "num_query_groups: 4"))
    code = main(["export-hf", "--ckpt", str(imported), "--out", str(tmp_path / "out"), "--layout", "remote-code",
                 "--model-yaml", str(wrong), "--tokenizer", str(imported.parent / "hf"), "--no-progress"])
    assert code == 2
    msg = _one_message(capsys.readouterr().err, "v2pe-convert")
    assert f"model.language.num_query_groups is 2 there, 4 in --model-yaml {wrong}" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.slow  # in-process, but megatron meta models (and the import fixture): 0.3-0.6 s each
def test_a_damaged_latest_falls_back_for_export_and_eval_loads(imported, tmp_path, caplog, monkeypatch):
    """``export-hf`` and ``load_model_weights`` (``v2pe-eval --ckpt``, ``checkpoint.pretrained``) of a
    training folder whose latest is truncated: they used to unpickle it (``EOFError: Ran out of
    input``); now the previous complete iteration is used, with the warning a resume gives."""
    from v2pe_megatron.convert import megatron as conv

    run = _training_dir(imported, tmp_path / "run", iterations=(4, 6))
    meta = ckpt.iteration_dir(run, 6) / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    read = []
    monkeypatch.setattr(conv, "_export_into", lambda tmp, src, *a: read.append(src) or [])  # the tensors: elsewhere
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        conv.export_hf(run, tmp_path / "out", layout="remote-code", progress=False)
    assert read == [ckpt.iteration_dir(run, 4)]
    assert f"skipping damaged checkpoint {ckpt.iteration_dir(run, 6)}: .metadata has 100 bytes" in caplog.text

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel

    with model_parallel(1, 1):
        model = build_model(load_recipe(TINY).model, Layout(spec="local"))
        assert ckpt.load_model_weights(run, [model]) == ckpt.iteration_dir(run, 4)


def test_vocabulary_padding_is_no_mismatch():
    """Embedding and output rows are the vocabulary padded to a multiple of the TP size the checkpoint
    was saved at (TP divides the KV heads): more rows than that, or fewer than the vocabulary, differ."""
    from v2pe_megatron.testing.tiny import tiny_recipe

    mc = tiny_recipe("model.language.vocab_size=511").model  # 2 KV groups: saved at TP 1 or 2
    expected = {"language_model.embedding.word_embeddings.weight": ((511, 64), True),
                "language_model.decoder.final_layernorm.weight": ((64,), False)}
    for rows, ok in ((511, True), (512, True), (510, False), (513, False)):
        stored = {"language_model.embedding.word_embeddings.weight": (rows, 64),
                  "language_model.decoder.final_layernorm.weight": (64,)}
        assert (ckpt.shape_mismatches(expected, stored, mc) == []) == ok, rows
    stored = {"language_model.embedding.word_embeddings.weight": (511, 64),
              "language_model.output_layer.weight": (511, 64)}
    assert ckpt.shape_mismatches(expected, stored, mc) == [
        "language_model.decoder.final_layernorm.weight: not in the checkpoint, the model has (64,)",
        "language_model.output_layer.weight: in the checkpoint, not in the model"]
