"""``v2pe-convert``: HuggingFace InternVL2 <-> megatron torch_dist checkpoints (docs/convert.md).

  v2pe-convert import-hf --hf DIR --out CKPT [--tp N --pp M] [--spec local|te] [--img-context-token-id N]
                         [--verify] [--force]
  v2pe-convert export-hf --ckpt CKPT --out DIR --layout remote-code|transformers [--tokenizer DIR]
                         [--v2pe-delta X] [--model-yaml FILE] [--verify] [--force]

Import with tp x pp > 1 starts that many ranks on this machine (or runs as one rank under torchrun /
srun). Exit codes: 0 done, 1 a checkpoint problem (the message names the tensor), 2 bad arguments.
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
    e = sub.add_parser("export-hf", help="torch_dist checkpoint (any layout) -> HF folder")
    e.add_argument("--ckpt", required=True, help="weights folder, iter_* folder or a training checkpoint.dir")
    e.add_argument("--out", required=True, help="HF folder to write")
    e.add_argument("--layout", required=True, choices=("remote-code", "transformers"))
    e.add_argument("--tokenizer", help="folder whose tokenizer files are copied")
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
    from v2pe_megatron.convert.errors import HFCheckpointError
    from v2pe_megatron.convert import megatron as conv
    from v2pe_megatron.convert.verify import verify_pair
    from v2pe_megatron.parallel.layout import LayoutError
    from v2pe_megatron.training.checkpointing import CheckpointError, ModelMismatch

    try:
        if args.cmd == "import-hf":
            if args.tp < 1 or args.pp < 1:
                print("v2pe-convert: --tp and --pp must be >= 1", file=sys.stderr)
                return exit_codes.USAGE
            if args.img_context_token_id is not None and args.img_context_token_id < 0:
                print("v2pe-convert: --img-context-token-id must be a token id (>= 0)", file=sys.stderr)
                return exit_codes.USAGE
            conv.check_out(args.out, args.force)
            n = args.tp * args.pp
            if n > 1 and not under_launcher():
                from v2pe_megatron.runtime.launch import run_local

                rank_args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--verify"]
                print(f"v2pe-convert: starting {n} ranks (tp={args.tp} pp={args.pp})", flush=True)
                code = run_local(["-m", "v2pe_megatron.cli.convert", *rank_args], n)
                if code != 0:
                    return code
                res = conv.ConvertResult(args.out, 0.0, 0, "", args.tp, args.pp)
            else:
                res = conv.import_hf(args.hf, args.out, tp=args.tp, pp=args.pp, spec=args.spec, force=args.force,
                                     progress=not args.no_progress, img_context_token_id=args.img_context_token_id)
                if not launch_rank() == 0:
                    return 0
                print(f"v2pe-convert: imported {res.tensors} HF tensors ({res.layout} layout) into {res.out} at "
                      f"tp={res.tp} pp={res.pp} in {res.seconds:.1f}s; it loads at any TP/PP "
                      f"(checkpoint.pretrained={res.out}; recipe sections in {res.out}/model.yaml)")
            if args.verify and launch_rank() == 0:
                _print_verify(verify_pair(args.hf, args.out, layout=_layout_of(args.hf)))
        else:
            res = conv.export_hf(args.ckpt, args.out, layout=args.layout, model_yaml=args.model_yaml,
                                 tokenizer=args.tokenizer, v2pe_delta=args.v2pe_delta, force=args.force,
                                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=not args.no_progress)
            print(f"v2pe-convert: exported {res.tensors} HF tensors ({args.layout} layout) to {res.out} "
                  f"in {res.seconds:.1f}s" + "".join(f"; {n}" for n in res.notes))
            if args.verify:
                _print_verify(verify_pair(args.out, args.ckpt, layout=res.layout))
    except (HFCheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.ERROR
    except LayoutError as e:  # e.g. --spec te without Transformer Engine
        print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.USAGE
    except CheckpointError as e:  # --ckpt of another model than --model-yaml (usage), or all damaged
        print(f"v2pe-convert: {e}", file=sys.stderr)
        return exit_codes.USAGE if isinstance(e, ModelMismatch) else exit_codes.ERROR
    return 0


def _layout_of(hf_dir: str) -> str:
    from v2pe_megatron.convert.hf_config import model_config_from_hf, read_config

    return model_config_from_hf(read_config(hf_dir))[1]


def _print_verify(r: dict) -> None:
    print(f"v2pe-convert: verify: max relative logits difference {r['max_rel_logits_diff']:.3g}, "
          f"top-1 agreement {r['top1_agreement']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
