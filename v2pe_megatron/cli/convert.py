"""``v2pe-convert``: HuggingFace InternVL2 <-> megatron torch_dist checkpoints (docs/convert.md).

  v2pe-convert import-hf --hf DIR --out CKPT [--tp N --pp M] [--spec local|te] [--img-context-token-id N]
                         [--verify] [--force]
  v2pe-convert export-hf --ckpt CKPT --out DIR --layout remote-code|transformers --tokenizer DIR
                         [--v2pe-delta X] [--model-yaml FILE] [--verify] [--force]

Import with tp x pp > 1 starts that many ranks on this machine (or runs as one rank under torchrun /
srun). The output is written to <out>.tmp, verified there (--verify), then renamed to --out; --out
must not be, be inside or contain an input. Exit codes: 0 done; 2 bad input (arguments, a layout that
cannot split the model, an HF folder or checkpoint that cannot be converted: the message names the
file or tensor and the fix), found before anything is published; 1 the work failed (a full disk, a
--verify mismatch): the partial output is removed, nothing is published.
"""

from __future__ import annotations

import argparse
import sys

from v2pe_megatron.cli.common import delta, launch_rank, under_launcher
from v2pe_megatron.runtime import exit_codes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v2pe-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("import-hf", help="HF folder (safetensors) -> torch_dist checkpoint")
    i.add_argument("--hf", required=True, help="HF checkpoint folder (config.json, safetensors, tokenizer files)")
    i.add_argument("--out", required=True, help="checkpoint folder to write (use as checkpoint.pretrained)")
    i.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks that share the work (any loads it)")
    i.add_argument("--pp", type=int, default=1, help="pipeline stages that share the work")
    i.add_argument("--spec", choices=("local", "te"), default="local",
                   help="layer modules of the meta model it writes through (the checkpoint is the same for both)")
    i.add_argument("--img-context-token-id", type=int, metavar="N",
                   help="id of the <IMG_CONTEXT> token, for a folder whose tokenizer files do not list it")
    i.add_argument("--verify", action="store_true", help="compare both sides' logits on random inputs")
    i.add_argument("--force", action="store_true", help="replace an existing --out")
    i.add_argument("--no-progress", action="store_true")
    i.add_argument("--staged", action="store_true", help=argparse.SUPPRESS)  # a rank: leave <out>.tmp to the parent
    e = sub.add_parser("export-hf", help="torch_dist checkpoint (any layout) -> HF folder")
    e.add_argument("--ckpt", required=True, help="weights folder, iter_* folder or a training checkpoint.dir")
    e.add_argument("--out", required=True, help="HF folder to write")
    e.add_argument("--layout", required=True, choices=("remote-code", "transformers"))
    e.add_argument("--tokenizer", help="folder whose tokenizer files (and remote code) are copied: the HF folder "
                   "the model came from (required)")
    e.add_argument("--v2pe-delta", type=delta, help="V2PE inference delta (k/256, e.g. 1/16 or 0.0625) written to config.json")
    e.add_argument("--model-yaml", help="recipe or model.yaml with the model section (default: beside the checkpoint)")
    e.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    e.add_argument("--verify", action="store_true", help="compare both sides' logits on random inputs")
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from v2pe_megatron.runtime.quiet import quiet_library_warnings

    quiet_library_warnings()
    from v2pe_megatron.convert.errors import ConvertWriteError, HFCheckpointError, VerifyError
    from v2pe_megatron.parallel.layout import LayoutError
    from v2pe_megatron.training.checkpointing import CheckpointError, ModelMismatch

    try:
        if args.cmd == "import-hf":
            return _import(args, argv)
        return _export(args)
    except CheckpointError as e:  # --ckpt of another model than --model-yaml (usage), or all damaged
        print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.USAGE if isinstance(e, ModelMismatch) else exit_codes.ERROR
    except (VerifyError, ConvertWriteError) as e:  # the work failed; nothing was published
        if launch_rank() == 0 or not getattr(e, "everywhere", False):
            print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.ERROR
    # bad input: arguments, paths, an HF folder or checkpoint that cannot be converted (HFCheckpointError
    # and the layout's LayoutError are ValueErrors), found before anything is published
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        # the converter's own errors reach every rank of an import at once: said once
        if launch_rank() == 0 or not isinstance(e, (HFCheckpointError, LayoutError)):
            print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.USAGE
    except OSError as e:  # e.g. a rename refused: the system's words, with the path
        print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.ERROR


def _import(args: argparse.Namespace, argv: list[str] | None) -> int:
    from v2pe_megatron.convert import megatron as conv

    if args.tp < 1 or args.pp < 1:
        print("v2pe-convert: --tp and --pp must be >= 1", file=sys.stderr)
        return exit_codes.USAGE
    if args.img_context_token_id is not None and args.img_context_token_id < 0:
        print("v2pe-convert: --img-context-token-id must be a token id (>= 0)", file=sys.stderr)
        return exit_codes.USAGE
    n = args.tp * args.pp
    if n > 1 and not under_launcher():
        import time

        from v2pe_megatron.runtime.launch import run_local

        # everything a rank could refuse is refused here, before any rank starts
        plan = conv.check_import(args.hf, args.out, tp=args.tp, pp=args.pp, spec=args.spec, force=args.force,
                                 img_context_token_id=args.img_context_token_id)
        t0 = time.time()
        # the ranks leave the output staged; this process verifies (--verify) and publishes it
        rank_args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--verify"] + ["--staged"]
        print(f"v2pe-convert: starting {n} ranks (tp={args.tp} pp={args.pp})", flush=True)
        code = run_local(["-m", "v2pe_megatron.cli.convert", *rank_args], n)
        if code != 0:
            conv.discard(conv.staging_dir(args.out))  # a rank that died (killed) could not clean up
            return code
        res = conv.ConvertResult(args.out, time.time() - t0, len(plan.reader.keys()), plan.layout, args.tp, args.pp)
    else:
        res = conv.import_hf(args.hf, args.out, tp=args.tp, pp=args.pp, spec=args.spec, force=args.force,
                             progress=not args.no_progress, img_context_token_id=args.img_context_token_id,
                             publish_output=False)
        if launch_rank() != 0 or args.staged:
            return 0
    _finish(conv.staging_dir(args.out), args.out, args.verify, lambda staged: (args.hf, staged, _layout_of(args.hf)))
    print(f"v2pe-convert: imported {res.tensors} HF tensors ({res.layout} layout) into {args.out} at "
          f"tp={res.tp} pp={res.pp} in {res.seconds:.1f}s; it loads at any TP/PP "
          f"(checkpoint.pretrained={args.out}; recipe sections in {args.out}/model.yaml)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from v2pe_megatron.convert import megatron as conv

    if args.tokenizer is None:
        # A folder of weights alone is no HF model: transformers loads the tokenizer (and, for
        # remote-code, the model's Python files) from the same folder, and import-hf takes the
        # <IMG_CONTEXT> id from its tokenizer files.
        print("v2pe-convert: export-hf needs --tokenizer DIR: the folder whose tokenizer files (and remote code) "
              "complete the HF folder, e.g. the HF folder the model was imported from; without them transformers "
              "cannot load the export and import-hf refuses it", file=sys.stderr)
        return exit_codes.USAGE
    res = conv.export_hf(args.ckpt, args.out, layout=args.layout, model_yaml=args.model_yaml,
                         tokenizer=args.tokenizer, v2pe_delta=args.v2pe_delta, force=args.force,
                         max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=not args.no_progress,
                         publish_output=False)
    _finish(conv.staging_dir(args.out), args.out, args.verify, lambda staged: (staged, args.ckpt, res.layout))
    print(f"v2pe-convert: exported {res.tensors} HF tensors ({args.layout} layout) to {args.out} "
          f"in {res.seconds:.1f}s" + "".join(f"; {n}" for n in res.notes))
    return 0


def _finish(staged, out: str, verify: bool, pair) -> None:
    """``--verify`` the complete output where it was written, then publish it: a failed verify leaves
    no output (and an existing one, replaced with ``--force``, unchanged)."""
    from v2pe_megatron.convert import megatron as conv
    from v2pe_megatron.convert.errors import VerifyError

    if verify:
        from v2pe_megatron.convert.verify import verify_pair

        hf_dir, ckpt, layout = pair(staged)
        try:
            _print_verify(verify_pair(hf_dir, ckpt, layout=layout))
        except BaseException as e:
            conv.discard(staged)
            if isinstance(e, VerifyError):
                raise VerifyError(f"{e}; nothing was written to {out}") from None
            raise
    conv.publish(staged, out)


def _layout_of(hf_dir: str) -> str:
    from v2pe_megatron.convert.hf_config import model_config_from_hf, read_config

    return model_config_from_hf(read_config(hf_dir))[1]


def _print_verify(r: dict) -> None:
    print(f"v2pe-convert: verify: max relative logits difference {r['max_rel_logits_diff']:.3g}, "
          f"top-1 agreement {r['top1_agreement']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
