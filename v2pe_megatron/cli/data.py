"""``v2pe-data``: look at a dataset through a recipe, or write a synthetic one.

    v2pe-data inspect [RECIPE.yaml] [--meta META.json] [--show K] [--max-samples N] [--skips-file F] [key=value ...]
    v2pe-data synth OUT_DIR [--num-samples N] [--format jsonl|webdataset] [--seed S] [--recipe RECIPE.yaml] ...
    v2pe-data synth OUT_DIR --needles [--lengths N ...] [--depths D ...] [--tasks T ...]
    v2pe-data synth OUT_DIR --needles --split train ...   (InternVL-format training samples, needles no eval set holds)

``synth --recipe`` sizes the samples so that every one fits that recipe whole (``inspect`` with the
same recipe then skips none). ``inspect`` runs one epoch of the training loader (one data-parallel
rank; ``--dp-rank/--dp-size``) and prints samples, tokens, tiles, packs and one
``skipped <reason>: <count>`` line per reason (the log names the first 3 of each); ``--skips-file F``
writes every skip, one JSON object a line (file, line or key, id, reason, message; ``-`` for stdout).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Sequence

_CTX_RUN = re.compile(r"(<IMG_CONTEXT>)+")


def _split_recipe_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    path, overrides = None, []
    for it in items:
        if "=" not in it and path is None:
            path = it
        else:
            overrides.append(it)
    return path, overrides


def _show(tok, batch, budget: int, chars: int) -> int:
    for r, lens in enumerate(batch.seq_lens):
        ids = batch.sample_ids[r]
        off = 0
        for k, L in enumerate(lens.tolist()):
            if budget <= 0:
                return 0
            if k < len(ids):
                seg = batch.tokens[r, off: off + L].tolist()
                text = _CTX_RUN.sub(lambda m: f"<IMG_CONTEXT x{len(m.group(0)) // 13}>", tok.decode(seg))
                trained = int(batch.loss_mask[r, off: off + L].sum())
                print(f"sample {int(ids[k])}: {L} tokens ({trained} trained): "
                      f"{text[:chars]!r}{' ...' if len(text) > chars else ''}")
                budget -= 1
            off += L
    return budget


def _open_skips_file(path: str | None):
    """The --skips-file stream, or the message saying why it cannot be written. A new file only:
    an existing one may be a user's input (an annotation file named by mistake)."""
    if not path:
        return None
    if path == "-":
        return sys.stdout
    try:
        return open(path, "x", encoding="utf-8")
    except FileExistsError:
        return f"--skips-file {path} exists; remove it or name a new file"
    except OSError as e:
        return f"--skips-file {path}: cannot create it ({e.strerror}); name a file in a writable folder"


def _inspect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from v2pe_megatron.config import RecipeError, load_recipe
    from v2pe_megatron.data.loader import build_train_loader
    from v2pe_megatron.data.skips import NoUsableSamplesError, SkipCounter

    path, overrides = _split_recipe_args(args.recipe_args)
    if args.meta:
        overrides.append(f"data.meta_path={args.meta}")
    try:
        recipe = load_recipe(path, overrides)
        loader = build_train_loader(recipe, dp_rank=args.dp_rank, dp_size=args.dp_size, max_epochs=1,
                                    record_skips=bool(args.skips_file))
    except (RecipeError, ValueError, FileNotFoundError, NoUsableSamplesError) as e:
        print(f"v2pe-data inspect: {e}", file=sys.stderr)
        return 2
    skips_out = _open_skips_file(args.skips_file)
    if isinstance(skips_out, str):
        loader.close()
        print(f"v2pe-data inspect: {skips_out}", file=sys.stderr)
        return 2
    # every DP rank reads (checks) the whole epoch; it decodes every dp_size-th micro-batch of it
    total = len(loader.index.epoch_order(0))
    if args.max_samples:
        total = min(total, args.max_samples)
    d = recipe.data
    src = d.meta_path or f"synthetic ({d.synthetic_num_samples} samples in memory)"
    print(f"data: {src}: {len(loader.index.datasets)} dataset(s), {len(loader.index)} samples after repeat_time; "
          f"dp rank {args.dp_rank}/{args.dp_size}: {total} samples")
    print(f"recipe: seq_length={d.seq_length} image_size={recipe.model.vision.image_size} tiles {d.min_dynamic_patch}.."
          f"{d.max_dynamic_patch} thumbnail={d.use_thumbnail} max_tiles_per_pack={d.max_tiles_per_pack} "
          f"overlong={d.overlong} v2pe={recipe.v2pe.policy}")
    show = args.show
    try:
        with tqdm(total=total, unit="sample", file=sys.stderr, disable=args.no_progress) as bar:
            for batch in loader:
                if skips_out is not None:
                    skips_out.writelines(json.dumps(r) + "\n" for r in loader.new_skip_records)
                read = loader.stats["samples"] + SkipCounter(loader.skips).total
                bar.update(min(read, total) - bar.n)
                if show:
                    show = _show(loader.tok, batch, show, args.chars)
                if args.max_samples and read >= args.max_samples:
                    break
    except NoUsableSamplesError as e:
        print(f"v2pe-data inspect: {e}", file=sys.stderr)
        return 2
    finally:
        loader.close()
        if skips_out is not None and skips_out is not sys.stdout:
            skips_out.close()
    st, skips = loader.stats, SkipCounter(loader.skips)
    fill = st["tokens"] / max(1, st["packs"] * d.seq_length)
    print(f"samples read: {st['samples'] + skips.total}")
    print(f"samples used: {st['samples']}")
    print(f"tokens: {st['tokens']}")
    print(f"tiles: {st['tiles']}")
    print(f"packs: {st['packs']} (filled {100 * fill:.1f}% with sample tokens)")
    print(f"micro-batches: {st['micro_batches']}")
    # One epoch here; training counts a bad sample again in every epoch that reads it.
    print(f"skips in this epoch (dp rank {args.dp_rank} of {args.dp_size}; training counts them once per epoch):")
    for line in skips.report_lines():
        print(line)
    if not skips.total:
        print("skipped: none")
    if args.skips_file and args.skips_file != "-":
        print(f"every skip: {args.skips_file} ({skips.total} line(s))")
    return 0


def _synth_needles(args: argparse.Namespace) -> int:
    from v2pe_megatron.data.needles import synth_needles, write_needles
    from v2pe_megatron.data.tokenizer import TokenizerError, build_tokenizer

    try:
        tok = build_tokenizer(args.tokenizer or "")
        samples, images = synth_needles(args.lengths, args.depths, tasks=args.tasks,
                                        samples_per_cell=args.samples_per_cell, seed=args.seed,
                                        count_tokens=lambda t: len(tok.encode(t)), image_tokens=args.image_tokens,
                                        image_fraction=args.image_fraction, split=args.split)
    except (TokenizerError, ValueError) as e:
        print(f"v2pe-data synth: {e}", file=sys.stderr)
        return 2
    if args.split == "train":
        return _write_needle_training(args, samples, images)
    try:
        path = write_needles(args.out_dir, samples, images)
    except FileExistsError as e:
        print(f"v2pe-data synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(samples)} needle samples ({len(args.tasks)} task(s) x {len(args.lengths)} length(s) x "
          f"{len(args.depths)} depth(s) x {args.samples_per_cell}) to {path}/annotations/<task>.jsonl and "
          f"{path}/images/ (MM-NIAH's layout and schema; v2pe-eval RECIPE --data {path})")
    return 0


def _write_needle_training(args: argparse.Namespace, samples, images) -> int:
    from pathlib import Path

    from v2pe_megatron.data.needles import training_records
    from v2pe_megatron.data.synthetic import write_synthetic

    meta = Path(args.out_dir) / "meta.json"
    if meta.exists():  # the folder may hold a user's data set: never write over it
        print(f"v2pe-data synth: {meta} exists: give an empty output folder", file=sys.stderr)
        return 2
    write_synthetic(args.out_dir, len(samples), fmt="jsonl",
                    records=(training_records(samples, args.prompt_style), images))
    print(f"wrote {len(samples)} needle training samples ({len(args.tasks)} task(s) x {len(args.lengths)} length(s) x "
          f"{len(args.depths)} depth(s) x {args.samples_per_cell}; the training split's needles, disjoint from "
          f"the evaluation sets') to {args.out_dir} (InternVL format; data.meta_path={meta})")
    return 0


def _synth(args: argparse.Namespace) -> int:
    if args.needles:
        return _synth_needles(args)
    from v2pe_megatron.data.synthetic import DEFAULT_SIZES, fit_to_recipe, write_synthetic

    given = {k: getattr(args, k) for k in DEFAULT_SIZES}
    if args.recipe is None:
        sizes = {k: DEFAULT_SIZES[k] if v is None else v for k, v in given.items()}
        meta = write_synthetic(args.out_dir, args.num_samples, args.seed, fmt=args.format,
                               shard_size=args.shard_size, **sizes)
        print(f"wrote {args.num_samples} samples ({args.format}) to {args.out_dir}")
        print(f"meta: {meta}")
        return 0
    from v2pe_megatron.config import RecipeError, load_recipe
    from v2pe_megatron.data.tokenizer import TokenizerError

    path, overrides = _split_recipe_args(args.recipe)
    try:
        recipe = load_recipe(path, overrides)
        fit = fit_to_recipe(recipe, args.num_samples, args.seed, **given)
    except (RecipeError, TokenizerError) as e:
        print(f"v2pe-data synth: {e}", file=sys.stderr)
        return 2
    meta = write_synthetic(args.out_dir, args.num_samples, args.seed, fmt=args.format, shard_size=args.shard_size,
                           records=(fit.records, fit.images))
    d = recipe.data
    sized = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in fit.sizes.items())
    print(f"wrote {args.num_samples} samples ({args.format}) to {args.out_dir}, sized for {path or 'the defaults'} "
          f"({sized})")
    if fit.too_long:
        print(f"v2pe-data synth: {fit.too_long} of {args.num_samples} samples do not fit data.seq_length="
              f"{d.seq_length} / data.max_tiles_per_pack={d.max_tiles_per_pack} with the sizes given: the loader "
              f"will truncate or skip them (give smaller --haystack-words / --max-images)", file=sys.stderr)
    else:
        print(f"every sample fits: longest {fit.longest} of data.seq_length={d.seq_length} tokens, at most "
              f"{fit.most_tiles} of data.max_tiles_per_pack={d.max_tiles_per_pack} tiles")
    print(f"meta: {meta}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from v2pe_megatron.runtime.quiet import quiet_library_warnings

    quiet_library_warnings()  # first: the parser's imports (data.needles) import megatron
    p = argparse.ArgumentParser(prog="v2pe-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    i = sub.add_parser("inspect", help="iterate a dataset through a recipe's loader and report")
    i.add_argument("recipe_args", nargs="*", help="optional recipe YAML, then key=value overrides")
    i.add_argument("--meta", help="meta JSON (sets data.meta_path)")
    i.add_argument("--dp-rank", type=int, default=0)
    i.add_argument("--dp-size", type=int, default=1)
    i.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: one epoch)")
    i.add_argument("--show", type=int, default=0, help="print the first K sub-samples, decoded")
    i.add_argument("--chars", type=int, default=240, help="characters shown per sample")
    i.add_argument("--no-progress", action="store_true")
    i.add_argument("--skips-file", metavar="PATH",
                   help="write every skipped sample as JSON lines (file, line, id, reason, message) to this new "
                        "file ('-': stdout); the log names only the first 3 per reason")
    i.set_defaults(fn=_inspect)

    s = sub.add_parser("synth", help="write a synthetic InternVL-format dataset (incl. needle-in-a-haystack)")
    s.add_argument("out_dir")
    s.add_argument("--num-samples", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=("jsonl", "webdataset"), default="jsonl")
    s.add_argument("--shard-size", type=int, default=64)
    s.add_argument("--recipe", nargs="+", metavar="RECIPE [key=value ...]",
                   help="size the samples for this recipe (and overrides): images of its tile size, haystacks "
                        "as long as every sample still fits its data.seq_length whole (checked per sample); "
                        "sizes given below are kept")
    s.add_argument("--min-side", type=int, default=None, help="smallest image side in px (default 64; with "
                   "--recipe half a tile)")
    s.add_argument("--max-side", type=int, default=None, help="largest image side in px (default 640; with "
                   "--recipe two tiles)")
    s.add_argument("--haystack-words", type=int, default=None, help="haystack length of the needle samples "
                   "(default 400; with --recipe the most that fits)")
    s.add_argument("--max-images", type=int, default=None, help="images per sample at most (default 4)")
    from v2pe_megatron.data.needles import PROMPT_STYLES, TASKS

    n = s.add_argument_group("needle mode (--needles): MM-NIAH-format evaluation data for v2pe-eval")
    n.add_argument("--needles", action="store_true", help="write needle-in-a-haystack samples on a length x depth grid")
    n.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096], help="context lengths in tokens")
    n.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
    n.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    n.add_argument("--samples-per-cell", type=int, default=1)
    n.add_argument("--image-tokens", type=int, default=256, help="tokens per image (InternVL2: 256 per 448 px tile)")
    n.add_argument("--image-fraction", type=float, default=0.5, help="share of each context that is images")
    n.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json or tokenizer.model) that counts the text (default: the tiny built-in one)")
    n.add_argument("--split", choices=("eval", "train"), default="eval",
                   help="eval: an evaluation set in MM-NIAH's layout; train: InternVL-format training samples "
                        "(meta.json + data.jsonl + images/) whose needles no evaluation set holds")
    n.add_argument("--prompt-style", choices=list(PROMPT_STYLES), default="mmniah",
                   help="--split train: how the question is asked (v2pe-eval's --prompt-style)")
    s.set_defaults(fn=_synth)

    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
