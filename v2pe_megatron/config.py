"""The typed recipe tree.

A recipe is a YAML file under ``recipes/`` merged onto these dataclasses (OmegaConf structured
configs), then dotted CLI overrides (``train.steps=10 parallel.tp=2``). Unknown keys and wrong types
are errors from OmegaConf; everything that depends on more than one field (layouts, divisibility) is
checked by :func:`validate`, before any process group or model exists, with messages that say what to
change.

Model shapes come from a named preset (``model.preset: tiny``) that the recipe's own ``model`` keys
then override, so a recipe only spells out what differs from a published architecture.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from v2pe_megatron.parallel.layout import Layout, LayoutError


class RecipeError(ValueError):
    """A recipe that cannot run; the message says which key to change and how."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    """InternViT. Defaults are InternViT-300M-448px."""

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layernorm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0
    # InternVL uses the last layer's output (select_layer = -1).
    select_layer: int = -1


@dataclass
class ProjectorConfig:
    """The projector (HF's ``mlp1``): pixel shuffle + LayerNorm + Linear + GELU + Linear."""

    downsample_ratio: float = 0.5
    layernorm_eps: float = 1e-5


@dataclass
class LanguageConfig:
    """The LLM. ``arch`` picks the HF naming/bias conventions: internlm2 | qwen2 | llama."""

    arch: str = "internlm2"
    num_layers: int = 24
    hidden_size: int = 2048
    num_attention_heads: int = 16
    num_query_groups: int = 8
    ffn_hidden_size: int = 8192
    vocab_size: int = 92553
    norm_eps: float = 1e-5
    rotary_base: float = 1_000_000.0
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    img_start_token_id: int = 92544
    img_end_token_id: int = 92545
    img_context_token_id: int = 92546
    # "auto": Transformer Engine specs when CUDA and TE are present and dtype is bf16/fp16, local
    # specs otherwise (parallel.layout.resolve_spec; TE has no fp32 attention for packed batches).
    spec: str = "auto"
    # fp32 | bf16 | fp16 (parameters and compute)
    dtype: str = "fp32"
    # The loss is computed vocab-parallel over this many tokens of the local sequence at a time, so a
    # [tokens, vocab] logits tensor never exists whole (1M tokens x 92K vocab is ~194 GB in bf16);
    # 0: the whole local sequence in one piece.
    loss_chunk_tokens: int = 0

    @property
    def num_image_token(self) -> int:
        """LLM tokens per image tile: (image/patch)^2 * downsample^2 (256 for InternVL2)."""
        side = self.vision.image_size // self.vision.patch_size
        return int(round(side * side * self.projector.downsample_ratio**2))


# ---------------------------------------------------------------------------------------------
# V2PE
# ---------------------------------------------------------------------------------------------
DEFAULT_DELTA_SET: list[float] = [1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


@dataclass
class V2PEConfig:
    """Visual position step. ``default``: delta 1 (plain arange); ``fixed``: ``delta`` for every
    image; ``random``: one delta per image drawn from ``delta_set`` with a generator seeded from
    ``seed`` and the sample's identity, so a resumed run draws the same deltas."""

    policy: str = "default"
    delta: float = 1.0
    delta_set: list[float] = field(default_factory=lambda: list(DEFAULT_DELTA_SET))
    seed: int = 1234


# ---------------------------------------------------------------------------------------------
# Parallelism
# ---------------------------------------------------------------------------------------------
@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # -1: derived as world_size / (tp * pp * cp)
    dp: int = -1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Interleaved pipeline: model chunks per pipeline rank (megatron's virtual pipeline stages).
    virtual_pp: int = 1
    # Language-model layers per pipeline stage (unequal splits allowed); empty: even split.
    pp_layers: list[int] = field(default_factory=list)
    # Context-parallel communication (Transformer Engine): p2p | a2a | a2a+p2p | all_gather
    cp_comm_type: str = "p2p"
    # For a2a+p2p: [a2a size, p2p size] with product == cp.
    hierarchical_cp_sizes: list[int] = field(default_factory=list)
    # Data-parallel communication overlapped with compute (training/engine.py, docs/parallelism.md):
    # gradient buckets reduced during the backward; with the distributed optimizer (and
    # overlap_grad_reduce) the updated parameters all-gathered during the next forward instead of
    # in the optimizer step (ignored otherwise). Off: both run after the backward, exposed.
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
# The values of data.template: InternVL's chat templates (their layouts: data.chat.TEMPLATES) and plain.
CHAT_TEMPLATES: tuple[str, ...] = ("internlm2-chat", "Hermes-2", "internvl2_5", "phi3-chat", "plain")


@dataclass
class DataConfig:
    # InternVL/V2PE meta JSON; empty means synthetic data.
    meta_path: str = ""
    # The model's tokenizer folder (tokenizer.json or tokenizer.model with its json files) or file;
    # empty means a tiny sentencepiece model trained in-process (tests/demo only). data.tokenizer.
    tokenizer_path: str = ""
    # InternVL's chat template of the model (data.chat.TEMPLATES; docs/data.md has which model uses which).
    template: str = "internlm2-chat"
    # The system turn of every conversation (training and v2pe-eval alike; data.chat.chat_format):
    # null = the template's own (internlm2-chat: InternVL's system message, as InternVL and V2PE
    # train and MM-NIAH evaluates), "" = none, any text = that text.
    system_prompt: Optional[str] = None
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 1
    # Tiles are model.vision.image_size pixels square: the one image size of a recipe.
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    max_tiles_per_pack: int = 64
    # What to do with samples longer than seq_length: truncate (at a safe boundary) | skip
    overlong: str = "truncate"
    packing: bool = True
    num_workers: int = 1
    # Where DALI decodes and tiles: auto (GPU "mixed" decode when CUDA is there) | cpu | gpu
    dali_device: str = "auto"
    seed: int = 42
    # Images whose header claims more pixels than this are skipped (counted as oversized_image)
    # before any decoding; 0 = no limit. Default: the size at which Pillow refuses an image as a
    # decompression bomb (2 x PIL.Image.MAX_IMAGE_PIXELS).
    max_image_pixels: int = 178_956_970
    # Synthetic data (used when meta_path is empty)
    synthetic_num_samples: int = 256


# ---------------------------------------------------------------------------------------------
# Optimization and training
# ---------------------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.03
    decay_style: str = "cosine"


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    log_interval: int = 1
    # token: mean over the trained tokens of the global batch. square: InternVL/V2PE's weighting,
    # every trained token of a sub-sample with n trained tokens weighs 1/sqrt(n), normalised by the
    # global batch's weight sum (training/loss.py).
    loss_reduction: str = "token"
    # none | selective | full
    recompute: str = "none"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    # Stop (after saving) once this many minutes have passed; 0 = no limit.
    wallclock_minutes: float = 0.0
    # Stop (after saving) once this job ran this many steps, e.g. to fit a scheduler slot; 0 = no limit.
    exit_after_steps: int = 0
    # Peak dense TFLOP/s of one device for the MFU figure; 0 = from the device table (v2pe_megatron.flops:
    # bf16/fp16 runs on known GPUs only; on the CPU, unknown devices and fp32 runs no MFU unless given).
    peak_tflops: float = 0.0
    # A step with a non-finite loss or grad norm is skipped (no update); this many in a row stop the
    # run (after saving) with exit_codes.NONFINITE; 0: never stop for it.
    max_nonfinite_steps: int = 10


@dataclass
class CheckpointConfig:
    dir: str = ""
    save_interval: int = 0
    load: bool = True
    format: str = "torch_dist"
    keep_last: int = 2
    # load=false over a folder that holds checkpoints is refused unless this is true (then the run
    # starts from scratch and overwrites what it saves; it never deletes another run's checkpoints).
    overwrite: bool = False
    # Start from these weights (a torch_dist checkpoint: an iter_* folder or a weights-only folder) with
    # a new optimizer and schedule at step 0; ignored when resuming from ``dir``.
    pretrained: str = ""


@dataclass
class TrackingConfig:
    # mlflow | none
    backend: str = "mlflow"
    # empty: embedded sqlite store under runs/<recipe>/
    tracking_uri: str = ""
    experiment: str = "v2pe-megatron"
    run_name: str = ""
    system_metrics: bool = True
    # Seconds between tries while the server is unreachable (the run is created, and the steps
    # logged meanwhile are sent, once it answers); tries happen on the tracker's thread, never in a step.
    retry_interval_s: float = 30.0


@dataclass
class LauncherConfig:
    # Processes to start on this node when the CLI is not already under torchrun/srun.
    nproc_per_node: int = 1
    nnodes: int = 1
    # auto: nccl with CUDA, gloo without | nccl | gloo
    backend: str = "auto"
    timeout_minutes: float = 10.0


@dataclass
class Recipe:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    v2pe: V2PEConfig = field(default_factory=V2PEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# ---------------------------------------------------------------------------------------------
# Presets: published shapes. Only keys that differ from the dataclass defaults (InternVL2-2B).
# ---------------------------------------------------------------------------------------------
_VIT_300M: dict[str, Any] = {}  # dataclass defaults are InternViT-300M-448px

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                   "image_size": 56, "patch_size": 14},
        "language": {"arch": "internlm2", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                     "num_query_groups": 2, "ffn_hidden_size": 128, "vocab_size": 512,
                     "rotary_base": 10000.0, "max_position_embeddings": 65536},
        # The in-process tiny sentencepiece tokenizer (data.tokenizer) puts its user-defined symbols
        # right after <unk> <s> </s>, in InternLM2's order: <|im_end|> 3, <|im_start|> 4, <img> 5,
        # </img> 6, <IMG_CONTEXT> 7.
        "img_start_token_id": 5, "img_end_token_id": 6, "img_context_token_id": 7,
    },
    "internvl2-1b": {
        "vision": _VIT_300M,
        "language": {"arch": "qwen2", "num_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
                     "num_query_groups": 2, "ffn_hidden_size": 4864, "vocab_size": 151655,
                     "norm_eps": 1e-6, "rotary_base": 1_000_000.0, "qkv_bias": True,
                     "tie_word_embeddings": False},
        "img_start_token_id": 151646, "img_end_token_id": 151647, "img_context_token_id": 151648,
    },
    "internvl2-2b": {"vision": _VIT_300M, "language": {}},
    "internvl2-8b": {
        "vision": _VIT_300M,
        "language": {"arch": "internlm2", "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "num_query_groups": 8, "ffn_hidden_size": 14336, "vocab_size": 92553,
                     "rotary_base": 1_000_000.0},
    },
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _fail(err: Exception, where: str) -> RecipeError:
    msg = str(err).strip().splitlines()
    return RecipeError(f"{where}: {' '.join(m.strip() for m in msg if m.strip())}")


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                *, validate_for_world_size: int | None = None) -> Recipe:
    """Recipe from a YAML file (or the defaults) plus ``a.b=value`` overrides, validated."""
    schema = OmegaConf.structured(Recipe)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as e:  # YAML syntax
            raise _fail(e, f"cannot parse {p}") from e
        # Either would otherwise become the defaults (an InternVL2-2B) or a traceback, after the build.
        if not OmegaConf.is_dict(layers[-1]):
            raise RecipeError(f"{p}: a recipe is a mapping of sections (name:, model:, data:, train:, ...), "
                              f"not a {type(layers[-1]).__name__.removesuffix('Config').lower()}: "
                              f"see recipes/tiny_cpu.yaml (v2pe-train --list shows the shipped recipes)")
        if len(layers[-1]) == 0:
            raise RecipeError(f"{p} is empty: a recipe needs at least its model (model: preset: tiny, ...): "
                              f"start from recipes/tiny_cpu.yaml (v2pe-train --list shows the shipped recipes)")
        if "name" not in layers[-1]:
            layers[-1]["name"] = p.stem
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"overrides must look like key.sub=value, got: {' '.join(bad)}")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise _fail(e, "cannot parse overrides") from e

    # The preset must be merged first so that the recipe's own model keys win over it.
    preset = None
    for layer in layers:
        preset = OmegaConf.select(layer, "model.preset", default=preset)
    try:
        if preset:
            if preset not in PRESETS:
                raise RecipeError(f"model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)}")
            schema = OmegaConf.merge(schema, {"model": PRESETS[preset]})
        merged = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as e:
        raise _fail(e, f"invalid recipe {path or ''}".strip()) from e
    recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(recipe, world_size=validate_for_world_size)
    return recipe


_ENV_PLACEHOLDER = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:,[^}]*)?\}")


def env_placeholders(path: str | os.PathLike) -> dict[str, str]:
    """``{dotted key: environment variable}`` for the recipe file's values that are nothing but an
    ``${oc.env:VAR,default}`` placeholder (the shipped 2B recipes' data, tokenizer and checkpoint
    folders), so that a message about such a key can name the variable that sets it."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, value in flatten(raw).items():
        m = _ENV_PLACEHOLDER.fullmatch(value.strip()) if isinstance(value, str) else None
        if m:
            out[key] = m.group(1)
    return out


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _choice(value: str, key: str, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"{key}={value!r} is not one of {', '.join(choices)}"]


def validate(recipe: Recipe, world_size: int | None = None, *, spec: str | None = None) -> Layout:
    """All cross-field checks; returns the recipe's :class:`~v2pe_megatron.parallel.layout.Layout`.

    ``world_size``: the ranks that will run it (dp derived, batch divisibility checked); ``spec``:
    the attention implementation resolved on the machine that runs it (default: ``model.spec`` as
    written, so ``auto`` defers the Transformer Engine rules to the run). Raises one RecipeError
    listing every problem found; the layout rules themselves live in ``parallel.layout``.
    """
    errs: list[str] = []
    m, par, d, t = recipe.model, recipe.parallel, recipe.data, recipe.train
    lm, vit = m.language, m.vision

    errs += _choice(m.dtype, "model.dtype", ("fp32", "bf16", "fp16"))
    errs += _choice(lm.arch, "model.language.arch", ("internlm2", "qwen2", "llama"))
    errs += _choice(recipe.v2pe.policy, "v2pe.policy", ("default", "fixed", "random"))
    errs += _choice(d.overlong, "data.overlong", ("truncate", "skip"))
    errs += _choice(d.dali_device, "data.dali_device", ("auto", "cpu", "gpu"))
    errs += _choice(d.template, "data.template", CHAT_TEMPLATES)
    errs += _choice(t.loss_reduction, "train.loss_reduction", ("token", "square"))
    errs += _choice(t.recompute, "train.recompute", ("none", "selective", "full"))
    errs += _choice(recipe.optimizer.name, "optimizer.name", ("adam", "sgd"))
    errs += _choice(recipe.optimizer.decay_style, "optimizer.decay_style", ("cosine", "linear", "constant"))
    errs += _choice(recipe.tracking.backend, "tracking.backend", ("mlflow", "none"))
    errs += _choice(recipe.launcher.backend, "launcher.backend", ("auto", "nccl", "gloo"))
    errs += _choice(recipe.checkpoint.format, "checkpoint.format", ("torch_dist",))

    for key, val in (("train.steps", t.steps), ("data.seq_length", d.seq_length),
                     ("data.micro_batch_size", d.micro_batch_size), ("launcher.nproc_per_node",
                     recipe.launcher.nproc_per_node), ("launcher.nnodes", recipe.launcher.nnodes)):
        if val < 1:
            errs.append(f"{key}={val} must be >= 1")

    if t.peak_tflops < 0:
        errs.append(f"train.peak_tflops={t.peak_tflops} must be >= 0 (0: the device table)")

    # V2PE
    v = recipe.v2pe
    if not 0.0 < v.delta <= 1.0:
        errs.append(f"v2pe.delta={v.delta} must be in (0, 1]")
    if not v.delta_set or any(not 0.0 < x <= 1.0 for x in v.delta_set):
        errs.append(f"v2pe.delta_set={v.delta_set} must be a non-empty list of values in (0, 1]")
    if v.seed < 0:  # numpy's SeedSequence (random delta policy) takes non-negative entropy only
        errs.append(f"v2pe.seed={v.seed} must be >= 0")

    # Model shapes
    if lm.num_query_groups < 1 or lm.num_attention_heads % lm.num_query_groups:
        errs.append(f"model.language.num_attention_heads={lm.num_attention_heads} must be a multiple of "
                    f"num_query_groups={lm.num_query_groups}")
    if lm.hidden_size % lm.num_attention_heads:
        errs.append(f"model.language.hidden_size={lm.hidden_size} must be divisible by "
                    f"num_attention_heads={lm.num_attention_heads}")
    if vit.image_size % vit.patch_size:
        errs.append(f"model.vision.image_size={vit.image_size} must be a multiple of patch_size={vit.patch_size}")
    side = vit.image_size // max(vit.patch_size, 1)
    r = m.projector.downsample_ratio
    if abs(side * r - round(side * r)) > 1e-9:
        errs.append(f"pixel shuffle needs (image_size/patch_size)*downsample_ratio = {side}*{r} to be an integer")

    # Batches and data
    if d.micro_batch_size >= 1 and d.global_batch_size % d.micro_batch_size:
        errs.append(f"data.global_batch_size={d.global_batch_size} must be a multiple of "
                    f"micro_batch_size={d.micro_batch_size}")
    if d.min_dynamic_patch < 1 or d.max_dynamic_patch < d.min_dynamic_patch:
        errs.append(f"need 1 <= data.min_dynamic_patch ({d.min_dynamic_patch}) <= max_dynamic_patch ({d.max_dynamic_patch})")
    if par.use_distributed_optimizer and recipe.optimizer.name != "adam":
        errs.append("parallel.use_distributed_optimizer=true needs optimizer.name=adam")

    c = recipe.checkpoint
    if c.pretrained and not (c.dir and c.load and (Path(c.dir) / "latest").is_file()):  # resuming ignores it
        from v2pe_megatron.training.checkpoint_files import weights_dir

        try:
            weights_dir(c.pretrained)
        except (OSError, ValueError, RuntimeError) as e:
            errs.append(f"checkpoint.pretrained={c.pretrained}: {e}")

    # The parallel layout: its own rules, then (with a world size) the data-parallel size.
    layout = Layout.from_config(par, spec=spec or m.spec)
    shapes = dict(model=m, seq_length=d.seq_length if d.seq_length >= 1 else None)
    layout_errs = layout.problems(**shapes)
    if world_size is not None and not layout_errs:
        try:
            layout = Layout.from_config(par, world_size=world_size, spec=spec or m.spec)
        except LayoutError as e:
            layout_errs.append(str(e))
        else:
            layout_errs += layout.problems(micro_batch_size=d.micro_batch_size,
                                           global_batch_size=d.global_batch_size)
    errs += layout_errs
    errs += _value_problems(recipe)
    if errs:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(errs))
    return layout


def _value_problems(recipe: Recipe) -> list[str]:
    """Ranges of single values and files that must exist: caught here, before any process group or
    model, instead of inside Adam or the data loader minutes later."""
    o, t, c, d = recipe.optimizer, recipe.train, recipe.checkpoint, recipe.data
    # (key, value, acceptable, the rule and its fix)
    rules = [
        ("optimizer.lr", o.lr, o.lr >= 0, "must be >= 0 (e.g. optimizer.lr=1e-4)"),
        ("optimizer.min_lr", o.min_lr, 0 <= o.min_lr <= max(o.lr, 0),
         f"must be in [0, optimizer.lr={o.lr}] (the cosine/linear decay goes from lr down to min_lr)"),
        ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0 (0 turns it off)"),
        ("optimizer.adam_beta1", o.adam_beta1, 0.0 <= o.adam_beta1 < 1.0, "must be in [0, 1) (typical: 0.9 / 0.999)"),
        ("optimizer.adam_beta2", o.adam_beta2, 0.0 <= o.adam_beta2 < 1.0, "must be in [0, 1) (typical: 0.9 / 0.999)"),
        ("optimizer.adam_eps", o.adam_eps, o.adam_eps > 0, "must be > 0 (typical: 1e-8)"),
        ("optimizer.clip_grad", o.clip_grad, o.clip_grad >= 0, "must be >= 0 (0 turns clipping off)"),
        ("optimizer.warmup_fraction", o.warmup_fraction, 0.0 <= o.warmup_fraction <= 1.0,
         "must be in [0, 1] (a fraction of train.steps, e.g. 0.03)"),
        ("train.log_interval", t.log_interval, t.log_interval >= 1, "must be >= 1 (steps between console lines)"),
        ("train.wallclock_minutes", t.wallclock_minutes, t.wallclock_minutes >= 0, "must be >= 0 (0 = no limit)"),
        ("train.exit_after_steps", t.exit_after_steps, t.exit_after_steps >= 0, "must be >= 0 (0 = no limit)"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps, t.max_nonfinite_steps >= 0,
         "must be >= 0 (0 = never stop for it)"),
        ("checkpoint.keep_last", c.keep_last, c.keep_last >= 0, "must be >= 0 (0 keeps every checkpoint)"),
        ("checkpoint.save_interval", c.save_interval, c.save_interval >= 0, "must be >= 0 (0 = save only at the end)"),
        ("data.global_batch_size", d.global_batch_size, d.global_batch_size >= 1, "must be >= 1"),
        ("model.loss_chunk_tokens", recipe.model.loss_chunk_tokens, recipe.model.loss_chunk_tokens >= 0,
         "must be >= 0 (0 = the loss in one piece; e.g. 8192 at long context)"),
        ("data.max_tiles_per_pack", d.max_tiles_per_pack, d.max_tiles_per_pack >= 1, "must be >= 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 1, "must be >= 1"),
        ("data.max_image_pixels", d.max_image_pixels, d.max_image_pixels >= 0, "must be >= 0 (0 = no limit)"),
        ("data.synthetic_num_samples", d.synthetic_num_samples, bool(d.meta_path) or d.synthetic_num_samples >= 1,
         "must be >= 1 (or set data.meta_path)"),
        ("launcher.timeout_minutes", recipe.launcher.timeout_minutes, recipe.launcher.timeout_minutes > 0,
         "must be > 0"),
        ("tracking.retry_interval_s", recipe.tracking.retry_interval_s, recipe.tracking.retry_interval_s > 0,
         "must be > 0 (seconds between tries while the MLflow server is unreachable)"),
    ]
    errs = [f"{key}={value} {rule}" for key, value, ok, rule in rules if not ok]
    if d.meta_path and not Path(d.meta_path).is_file():
        errs.append(f"data.meta_path={d.meta_path!r}: no such file (relative paths are from "
                    f"{os.getcwd()}; leave it empty for synthetic data)")
    tp = Path(d.tokenizer_path)
    if d.tokenizer_path and not (tp.is_file() or (tp / "tokenizer.json").is_file()
                                 or (tp / "tokenizer.model").is_file()):
        errs.append(f"data.tokenizer_path={d.tokenizer_path!r}: no such file (the model's tokenizer folder with "
                    f"tokenizer.json or tokenizer.model, or that file; leave it empty for the built-in tiny "
                    f"tokenizer)")
    return errs


def expected_world_size(recipe: Recipe) -> int:
    """World size the recipe's launcher section asks for."""
    return recipe.launcher.nproc_per_node * recipe.launcher.nnodes
