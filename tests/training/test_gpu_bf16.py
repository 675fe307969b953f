"""On CUDA: one training step of the tiny LLM in bf16 against fp32, from the same weights and batch.

bf16 runs through megatron's mixed-precision optimizer (fp32 main weights, fp32 gradient buffers),
so only the bf16 rounding of weights and activations separates the two: the loss and every
gradient must agree to within it. SGD with lr=1 keeps the step simple; the gradients are read from
the DDP buffers (``main_grad``), where both runs keep them in fp32.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SEQ, MBS, NUM_MICRO = 64, 2, 4


def one_step(dtype: str, init: dict[str, torch.Tensor] | None) -> dict:
    """One step of the tiny LLM at ``dtype``: loss, grad norm, fp32 gradients and the initial weights."""
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp

    # clip_grad only makes the optimizer report the norm; 1e6 never clips
    recipe = tiny.tiny_recipe(f"model.dtype={dtype}", "optimizer.name=sgd", "optimizer.lr=1.0",
                              "optimizer.clip_grad=1e6", f"data.seq_length={SEQ}")
    torch.manual_seed(0)
    model = tiny.build_language_model(recipe)
    if init is not None:
        model.load_state_dict(init, strict=True)  # copy_ casts fp32 -> bf16
    start = {k: v.detach().float().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    ddp = wrap_ddp(model, model.config)
    opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=model.config.params_dtype)
    batches = tiny.synthetic_lm_batches(NUM_MICRO, micro_batch_size=MBS, seq_length=SEQ,
                                        vocab_size=recipe.model.language.vocab_size, seed=3)
    res = train_step([ddp], opt, tiny.lm_forward_step, iter(batches), num_microbatches=NUM_MICRO,
                     seq_length=SEQ, micro_batch_size=MBS)
    grads = {n: p.main_grad.detach().float().cpu() for n, p in model.named_parameters()}
    return {"loss": res.loss, "grad_norm": res.grad_norm, "grads": grads, "start": start,
            "param_dtype": next(model.parameters()).dtype, "device": next(model.parameters()).device.type}


def bf16_against_fp32() -> tuple[dict, dict]:
    from v2pe_megatron.runtime.distributed import model_parallel

    with model_parallel(1, 1, seed=0):
        fp32 = one_step("fp32", None)
        bf16 = one_step("bf16", fp32["start"])
    print(f"\n{fp32['device']}: loss fp32 {fp32['loss']:.5f} bf16 {bf16['loss']:.5f}; "
          f"grad norm fp32 {fp32['grad_norm']:.5f} bf16 {bf16['grad_norm']:.5f}")
    return fp32, bf16


def check_close(fp32: dict, bf16: dict) -> None:
    assert fp32["param_dtype"] == torch.float32 and bf16["param_dtype"] == torch.bfloat16
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=3e-2)
    g32 = torch.cat([g.flatten() for g in fp32["grads"].values()])
    g16 = torch.cat([bf16["grads"][n].flatten() for n in fp32["grads"]])
    assert torch.linalg.vector_norm(g16 - g32) / torch.linalg.vector_norm(g32) < 5e-2
    for n, g in fp32["grads"].items():  # no tensor is off on its own (a layer skipped, a wrong cast)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), bf16["grads"][n].flatten(), dim=0)
        assert cos > 0.98, (n, float(cos))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_step_matches_fp32():
    fp32, bf16 = bf16_against_fp32()
    assert fp32["device"] == bf16["device"] == "cuda"
    check_close(fp32, bf16)


if __name__ == "__main__":  # the same comparison on whatever device there is (CPU: gloo); device_check --dry-run
    check_close(*bf16_against_fp32())
    print("bf16 step matches fp32")
