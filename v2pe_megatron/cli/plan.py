"""``v2pe-plan``: which parallel layouts of a model fit a cluster at a sequence length, and how fast.

    v2pe-plan --model internvl2-2b --seq 1048576 --gpus 64 --gpu-mem 80 [--json] [--write-recipe FILE [--force]]

Per layout: tp, pp, virtual pp, cp, dp, micro-batch, recompute, CP communication type, the memory
per GPU (parameters, gradients, optimizer state, activations, logits, communication buffers, total),
the estimated step time and MFU; the fastest layout that fits is marked recommended. When nothing
fits it says why and what would (more GPUs, a shorter sequence). The model: docs/planning.md.
Exit status 0 when a layout fits, 1 when none does, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v2pe-plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model preset (config.PRESETS), e.g. internvl2-2b")
    ap.add_argument("--seq", type=int, required=True, help="tokens per packed sequence, e.g. 1048576")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    ap.add_argument("--global-batch", type=int, default=32, help="packs per optimizer step (V2PE: 32)")
    ap.add_argument("--image-share", type=float, default=0.5,
                    help="fraction of a pack's tokens that are image tokens (tiles = seq x share / 256)")
    ap.add_argument("--sub-sample", type=int, default=0,
                    help="longest sample in a pack, for the attention FLOPs (default: the whole pack)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=0,
                    help="model.loss_chunk_tokens of the run (0: logits of the whole local sequence at once)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--spec", choices=("te", "local"), default="te",
                    help="layer implementation the run uses: te (Transformer Engine, default) or local")
    ap.add_argument("--top", type=int, default=10, help="layouts to list (0: all that fit)")
    ap.add_argument("--json", action="store_true", help="print the layouts as a JSON list")
    ap.add_argument("--write-recipe", metavar="FILE",
                    help="write a recipe YAML for the recommended layout (its folder is created)")
    ap.add_argument("--force", action="store_true", help="let --write-recipe replace an existing file")
    args = ap.parse_args(argv)

    problem = _usage_problem(args)
    if problem:
        print(f"v2pe-plan: {problem}", file=sys.stderr)
        return 2

    from omegaconf import OmegaConf

    from v2pe_megatron.config import RecipeError
    from v2pe_megatron.plan import Cluster, format_plan, plan, recipe_dict

    try:
        cluster = Cluster(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, gpus_per_node=args.gpus_per_node)
        p = plan(args.model, args.seq, args.gpus, args.gpu_mem, global_batch_size=args.global_batch,
                 image_share=args.image_share, sub_sample=args.sub_sample or None,
                 loss_chunk_tokens=args.loss_chunk_tokens, cluster=cluster, path=args.spec)
    except RecipeError as e:
        print(f"v2pe-plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        shown = p.candidates if args.top <= 0 else p.candidates[:args.top]
        print(json.dumps([c.as_json() for c in shown], indent=1))
        if not p.candidates:
            print("\n".join(["nothing fits:"] + p.advice), file=sys.stderr)
    else:
        print(format_plan(p, top=args.top))
    if args.write_recipe:
        if p.recommended is None:
            print("v2pe-plan: nothing fits, no recipe written", file=sys.stderr)
            return 1
        _write(Path(args.write_recipe), OmegaConf.to_yaml(OmegaConf.create(
            recipe_dict(p, name=Path(args.write_recipe).stem, loss_chunk_tokens=args.loss_chunk_tokens))))
        print(f"wrote {args.write_recipe}", file=sys.stderr)
    return 0 if p.candidates else 1


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The flags the planner itself does not see, checked before planning (the rest: ``plan``)."""
    from v2pe_megatron.runtime.paths import unwritable_dir

    if args.top < 0:
        return f"--top {args.top} must be >= 0 (0: every layout that fits)"
    if args.write_recipe:
        out = Path(args.write_recipe)
        if out.is_dir():
            return f"--write-recipe {out} is a folder; give a file name, e.g. {out / 'plan.yaml'}"
        if out.exists() and not args.force:
            return f"--write-recipe {out} exists; pass --force to replace it, or give another file name"
        # A missing folder is made, as every output folder of the tools is: the recipe is new output,
        # and the "wrote" line names where it went.
        why = unwritable_dir(out.parent)
        if why:
            return f"--write-recipe {out}: {why}"
    return None


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a recipe cut short by a full disk would replace a good one (--force)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
