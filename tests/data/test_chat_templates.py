"""HF ``tokenizers`` folders beside sentencepiece, InternVL's chat templates and the assistant-only
mask, on tiny tokenizer folders built here with the ``tokenizers`` library (no download): a Qwen2-like
byte-level BPE (no BOS), a Llama-3-like one whose post-processor adds its BOS, and a Phi-3-like
Metaspace BPE with ``<s>`` and Phi-3's chat tokens. Every family's specials and ids are written to the
folder's json files the way HF checkpoints hold them, and read back from there."""

from __future__ import annotations

import json

import numpy as np
import pytest

from v2pe_megatron.config import load_recipe
from v2pe_megatron.data.chat import (
    INTERNVL2_5_SYSTEM_MESSAGE, INTERNVL_SYSTEM_MESSAGE, TEMPLATES, ChatFormat, chat_format, render_conversation,
    tokenize_sample)
from v2pe_megatron.data.tokenizer import (
    HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer, save_tiny_tokenizer, tiny_tokenizer)

CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is in the picture? A red cat on a mat.",
          "Describe the image in detail. The answer is forty two.", "user assistant system",
          "你好，世界。书生万象 InternVL", "Numbers 0 1 2 3 4 5 6 7 8 9, and more words here."] * 3
IMAGE = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

# family -> (leading specials, InternVL's added tokens, named tokens, how BOS is added)
FAMILIES = {
    # Qwen2/2.5 (InternVL2-1B, 2.5, 3): no BOS; eos <|im_end|>, pad <|endoftext|>.
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], IMAGE,
              {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, None),
    # Llama-3 (InternVL2-76B): its post-processor puts <|begin_of_text|> first; no add_bos_token key.
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"], IMAGE,
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "post_processor"),
    # Phi-3 (InternVL2-4B): sentencepiece-like, <s> via add_bos_token, its own chat tokens.
    "phi3": (["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], IMAGE,
             {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}, "config"),
}


def make_folder(path, family: str, *, chat_template: str | None = None):
    """A tokenizer folder like an HF checkpoint's: tokenizer.json, tokenizer_config.json (with
    added_tokens_decoder) and special_tokens_map.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lead, added, named, bos_rule = FAMILIES[family]
    if family == "phi3":
        # Phi-3's fast tokenizer as transformers saves it (legacy=False): one "\u2581" before the text only.
        tk = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=lead,
                                      initial_alphabet=sorted(set("".join(CORPUS) + "\nS?")))
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=lead,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens(added)
    if bos_rule == "post_processor":
        bos = named["bos_token"]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    decoder = {str(tk.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                         "normalized": False, "single_word": False} for t in lead + added}
    cfg = {"added_tokens_decoder": decoder, "tokenizer_class": "PreTrainedTokenizerFast",
           "model_max_length": 8192, **named}
    if bos_rule == "config":
        cfg["add_bos_token"] = True
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    (path / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in named.items() if v}))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {f: make_folder(root / f, f) for f in FAMILIES}


# ---------------------------------------------------------------------------------------------
# Which tokenizer, and its ids from the folder's files
# ---------------------------------------------------------------------------------------------
def test_folder_picks_the_backend_and_reads_ids_from_its_files(folders, tmp_path):
    for fam, folder in folders.items():
        tok = load_tokenizer(folder)
        assert isinstance(tok, HFTokenizer), fam
        dec = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        by_content = {v["content"]: int(k) for k, v in dec.items()}
        assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == (
            by_content["<img>"], by_content["</img>"], by_content["<IMG_CONTEXT>"]), fam
        assert tok.eos_id == by_content[FAMILIES[fam][2]["eos_token"]]
        assert tok.vocab_size == max(by_content.values()) + 1
        # every special string is one id, inside text too
        ids = tok.encode("a <img><IMG_CONTEXT></img> cat")
        assert ids.count(tok.img_context_id) == 1 and tok.decode(ids) == "a <img><IMG_CONTEXT></img> cat"
    q, l3, p3 = (load_tokenizer(folders[f]) for f in ("qwen2", "llama3", "phi3"))
    assert (q.add_bos, q.bos_id, q.pad_id, q.im_end_id) == (False, None, q.specials["<|endoftext|>"], q.eos_id)
    assert l3.add_bos and l3.bos_id == l3.specials["<|begin_of_text|>"]       # from its post-processor
    assert p3.add_bos and p3.bos_id == p3.specials["<s>"] and p3.im_start_id is None  # from add_bos_token

    # a folder with only tokenizer.model is sentencepiece; with both, tokenizer.json wins
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    save_tiny_tokenizer(tiny_tokenizer(), sp_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    both = make_folder(tmp_path / "both", "qwen2")
    save_tiny_tokenizer(tiny_tokenizer(), both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), HFTokenizer)
    assert isinstance(load_tokenizer(both / "tokenizer.model"), SentencePieceTokenizer)  # a file names its kind


def test_unreadable_or_foreign_tokenizer_json_is_a_clear_error(folders, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer files cannot be read"):
        load_tokenizer(bad)
    # a plain LLM tokenizer without InternVL's image tokens
    from tokenizers import Tokenizer, models
    plain = tmp_path / "plain"
    plain.mkdir()
    Tokenizer(models.BPE()).save(str(plain / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"no id for \['<img>'"):
        load_tokenizer(plain)
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Templates: layout, ids = tokenizer(rendered text), the mask
# ---------------------------------------------------------------------------------------------
CONV = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red cat."},
        {"from": "human", "value": "And here <image> ?"}, {"from": "gpt", "value": "The lazy dog, 你好。"}]
ANSWERS = ["A red cat.", "The lazy dog, 你好。"]
NIT, TILES = 2, [2, 1]
I1 = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
I2 = "<img>" + "<IMG_CONTEXT>" * 2 + "</img>"

# The layouts written out by hand from InternVL's conversation.py (system message "S").
EXPECTED = {
    "internlm2-chat": ("<|im_start|>system\nS<|im_end|><|im_start|>user\n" + I1 + "\nWhat is in the picture?<|im_end|>"
                       "<|im_start|>assistant\nA red cat.<|im_end|><|im_start|>user\nAnd here " + I2 + " ?<|im_end|>"
                       "<|im_start|>assistant\nThe lazy dog, 你好。<|im_end|>"),
    "internvl2_5": ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n" + I1 + "\nWhat is in the picture?<|im_end|>\n"
                    "<|im_start|>assistant\nA red cat.<|im_end|>\n<|im_start|>user\nAnd here " + I2 + " ?<|im_end|>\n"
                    "<|im_start|>assistant\nThe lazy dog, 你好。<|im_end|>\n"),
    "phi3-chat": ("<|system|>\nS<|end|><|user|>\n" + I1 + "\nWhat is in the picture?<|end|>"
                  "<|assistant|>\nA red cat.<|end|><|user|>\nAnd here " + I2 + " ?<|end|>"
                  "<|assistant|>\nThe lazy dog, 你好。<|end|>"),
}
EXPECTED["Hermes-2"] = EXPECTED["internlm2-chat"]
# template -> the fixture families it is checked on
CASES = [("internlm2-chat", "llama3"), ("internlm2-chat", "sp"), ("Hermes-2", "qwen2"), ("internvl2_5", "qwen2"),
         ("internvl2_5", "llama3"), ("internvl2_5", "sp"), ("phi3-chat", "phi3")]


def _tok(folders, fam):
    return tiny_tokenizer() if fam == "sp" else load_tokenizer(folders[fam])


def _runs(mask):
    """[start, end) of each run of True."""
    m = np.concatenate([[False], mask, [False]]).astype(int)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


@pytest.mark.parametrize("template,fam", CASES)
def test_template_layout_ids_and_assistant_only_mask(folders, template, fam):
    tok = _tok(folders, fam)
    chat = ChatFormat(template, "S")
    text = render_conversation(CONV, tiles_per_image=TILES, num_image_token=NIT, chat=chat)
    assert text == EXPECTED[template]
    got = tokenize_sample(tok, conversations=CONV, tiles_per_image=TILES, num_image_token=NIT, chat=chat)
    # the ids are what the tokenizer makes of the rendered text (BOS where the tokenizer adds one)
    bos = [tok.bos_id] if tok.add_bos else []
    np.testing.assert_array_equal(got.ids, bos + tok.encode(text))
    assert got.num_images == 2 and int((got.ids == tok.img_context_id).sum()) == NIT * sum(TILES)
    # the mask: exactly one run per answer, each the answer and its end token, nothing else
    end = TEMPLATES[template].end
    runs = _runs(got.target)
    assert len(runs) == len(ANSWERS)
    for (a, b), answer in zip(runs, ANSWERS):  # decoded in context: a decoder may treat a first token apart
        assert tok.decode(got.ids[:b]) == tok.decode(got.ids[:a]) + answer + end
    assert all(got.ids[b - 1] == tok.token_id(end) for _, b in runs)
    assert not got.target[np.isin(got.ids, [tok.img_start_id, tok.img_end_id, tok.img_context_id])].any()
    # everything before each run ends with the assistant header: the header is prompt
    header = TEMPLATES[template].assistant[0] + TEMPLATES[template].assistant[1]
    assert all(tok.decode(got.ids[:a]).endswith(header) for a, _ in runs)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_default_system_messages_and_sample_system_turn(template):
    class Data:
        system_prompt = None

    Data.template = template
    want = INTERNVL2_5_SYSTEM_MESSAGE if template == "internvl2_5" else INTERNVL_SYSTEM_MESSAGE
    chat = chat_format(Data)
    assert chat.system == want
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    t = TEMPLATES[template]
    assert render_conversation(conv, chat=chat).startswith(t.system[0] + t.system[1] + want + t.end)
    # a sample's own system turn wins; "" leaves the block out
    assert render_conversation([{"from": "system", "value": "Mine"}, *conv], chat=chat).startswith(
        t.system[0] + t.system[1] + "Mine" + t.end)
    assert render_conversation(conv, chat=ChatFormat(template, "")).startswith(t.user[0] + t.user[1] + "Hi")


# The chat template transformers writes for InternVL's native ("-hf") checkpoints: the internvl2_5
# layout without a default system message. Data, recorded from transformers'
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py (``chat_template``).
HF_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.slow  # transformers' import alone takes ~2 s
def test_internvl2_5_matches_the_hf_chat_template(tmp_path):
    from transformers import AutoTokenizer

    folder = make_folder(tmp_path / "q", "qwen2", chat_template=HF_INTERNVL_CHAT_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "system", "content": INTERNVL2_5_SYSTEM_MESSAGE},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
                {"role": "assistant", "content": "A red cat."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    hf_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for tiles in TILES:  # InternVL's processor expands each <image> in order
        hf_text = hf_text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (NIT * tiles) + "</img>", 1)
    conv = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red cat."},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": None}]
    chat = ChatFormat("internvl2_5", INTERNVL2_5_SYSTEM_MESSAGE)
    ours = render_conversation(conv, tiles_per_image=TILES, num_image_token=NIT, chat=chat)
    assert ours == hf_text
    # and the ids of the whole conversation agree with transformers' tokenizer of the same folder
    full = [conv[0], conv[1], {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "Two dogs."}]
    got = tokenize_sample(load_tokenizer(folder), conversations=full, tiles_per_image=TILES, num_image_token=NIT,
                          chat=chat)
    text = render_conversation(full, tiles_per_image=TILES, num_image_token=NIT, chat=chat)
    assert got.ids.tolist() == hf(text, add_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Recipe: data.template, the preflight check of ids and template tokens
# ---------------------------------------------------------------------------------------------
def _recipe(folder, tok, *extra):
    return load_recipe(None, ["tracking.backend=none", f"data.tokenizer_path={folder}",
                              f"model.img_start_token_id={tok.img_start_id}", f"model.img_end_token_id={tok.img_end_id}",
                              f"model.img_context_token_id={tok.img_context_id}", *extra])


def test_preflight_checks_a_tokenizer_json_folder(folders):
    from v2pe_megatron import preflight
    from v2pe_megatron.config import RecipeError

    tok = load_tokenizer(folders["qwen2"])
    preflight.check_tokenizer(_recipe(folders["qwen2"], tok, "data.template=Hermes-2"))
    with pytest.raises(preflight.PreflightError, match=r"model.img_context_token_id=7 but the tokenizer has "
                                                       rf"{tok.img_context_id}.*tokenizer.json"):
        preflight.check_tokenizer(_recipe(folders["qwen2"], tok, "model.img_context_token_id=7"))
    # phi3-chat needs <|user|> etc., which a Qwen tokenizer lacks
    with pytest.raises(preflight.PreflightError, match=r"data.template=phi3-chat writes \['<\|system\|>'"):
        preflight.check_tokenizer(_recipe(folders["qwen2"], tok, "data.template=phi3-chat"))
    p3 = load_tokenizer(folders["phi3"])
    preflight.check_tokenizer(_recipe(folders["phi3"], p3, "data.template=phi3-chat"))
    with pytest.raises(RecipeError, match="data.template"):
        load_recipe(None, ["data.template=chatml"])


def test_eval_generation_ends_at_the_templates_own_end_token(folders):
    """v2pe-eval closes an answer where the recipe's template does: phi3-chat's ``<|end|>``, not
    ``<|im_end|>`` (which a Phi-3 tokenizer does not have); the oracle's answer scores 1."""
    from v2pe_megatron.data.needles import synth_needles
    from v2pe_megatron.eval.runner import EvalSettings, OracleBackend, prepare_sample, score

    tok = load_tokenizer(folders["phi3"])
    samples, _ = synth_needles([64], [0.5], tasks=("retrieval-text",), count_tokens=lambda t: len(tok.encode(t)),
                               image_tokens=4, image_fraction=0.0)
    chat = ChatFormat("phi3-chat", "")
    p = prepare_sample(samples[0], tok, None, image_size=56, num_image_token=4, max_tiles=1, use_thumbnail=True,
                       chat=chat)
    assert p.end_id == chat.answer_end_id(tok) == tok.token_id("<|end|>")
    rec = score(p, 1.0, OracleBackend(), tok, EvalSettings(deltas=[1.0], modes=("generate",)), pad_multiple=1)
    assert rec["generate"] == 1.0, rec["response"]
