"""``v2pe-data synth --recipe``: synthetic samples sized so that every one fits the recipe whole (the
README's ``synth`` + ``inspect`` pair used to lose 40% of the samples to ``no_loss_tokens``)."""

from __future__ import annotations

from v2pe_megatron.data.synthetic import fit_to_recipe, sample_lengths, synth_records
from v2pe_megatron.data.tokenizer import tiny_tokenizer
from v2pe_megatron.testing.tiny import tiny_recipe


def test_fit_to_recipe_fits_every_sample_and_keeps_given_sizes():
    # no system turn, as recipes/tiny_cpu.yaml: InternVL's is 162 tokens in the tiny tokenizer
    recipe = tiny_recipe("data.seq_length=256", "data.max_dynamic_patch=4", "data.system_prompt=''")
    tok = tiny_tokenizer()
    # the haystack v2pe-data synth wrote for every recipe: needle samples far longer than 256 tokens
    recs, imgs = synth_records(10, 0, min_side=28, max_side=112, haystack_words=400, max_images=4)
    assert sum(n > 256 for n, _ in sample_lengths(recs, imgs, recipe, tok)) >= 4

    fit = fit_to_recipe(recipe, 10, 0, tokenizer=tok)
    lengths = sample_lengths(fit.records, fit.images, recipe, tok)
    assert fit.too_long == 0 and max(n for n, _ in lengths) == fit.longest <= 256
    assert fit.sizes["haystack_words"] >= 10  # still needles in a haystack
    assert fit.sizes["min_side"] == 28 and fit.sizes["max_side"] == 112  # the tiny preset's 56 px tiles
    kinds = {r["id"].rsplit("-", 1)[-1] for r in fit.records}
    assert kinds == {"caption", "multi", "text", "niah_text", "niah_image"}

    # sizes the user gives are kept, and what they cost is counted instead of hidden
    forced = fit_to_recipe(recipe, 10, 0, tokenizer=tok, haystack_words=400, max_images=4)
    assert forced.sizes["haystack_words"] == 400 and forced.too_long >= 4


def test_fit_to_recipe_shrinks_images_when_tiles_do_not_fit():
    recipe = tiny_recipe("data.seq_length=256", "data.max_dynamic_patch=4", "data.max_tiles_per_pack=3")
    fit = fit_to_recipe(recipe, 10, 0, tokenizer=tiny_tokenizer())
    assert fit.too_long == 0 and fit.most_tiles <= 3 and fit.sizes["max_images"] < 4
