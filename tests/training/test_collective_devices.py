"""``check_collective_devices``: CI is CPU-only, so a collective on a tensor made without a device
passes here and fails on the first GPU run (NCCL: "No backend type associated with device type cpu").
The checker makes such collectives fail on CPU too; the training loop, with a checkpoint and a resume,
runs under it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from v2pe_megatron.runtime import distributed as rt
from v2pe_megatron.testing.collectives import check_collective_devices
from v2pe_megatron.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def one_rank():
    with rt.model_parallel():
        yield


def _flagged(fn) -> str:
    with check_collective_devices(), pytest.raises(AssertionError) as e:
        fn()
    return str(e.value)


def test_flags_tensor_made_without_device(one_rank):
    msg = _flagged(lambda: dist.all_reduce(torch.tensor([1.0])))
    assert "dist.all_reduce" in msg and "torch.tensor() without a device" in msg
    assert "test_collective_devices.py" in msg and "No backend type associated with device type cpu" in msg


def test_flags_tensor_derived_from_one(one_rank):
    msg = _flagged(lambda: dist.all_reduce(torch.tensor([1]).double() * 2, op=dist.ReduceOp.MAX))
    assert "torch.tensor() without a device" in msg and "double -> mul" in msg
    assert "torch.zeros()" in _flagged(lambda: dist.broadcast(torch.zeros(3).view(3, 1).t().contiguous(), 0))


@pytest.mark.parametrize("make", [
    lambda: torch.from_numpy(np.ones(2)),
    lambda: torch.ones(2, device=rt.device()).cpu(),
    lambda: torch.tensor([[1.0, 2.0]]).unbind(0)[0],
    lambda: torch.stack([torch.arange(2.0), torch.zeros(2, device=rt.device())]),
], ids=["from_numpy", "cpu", "view-outputs", "mixed-inputs"])
def test_flags_other_host_tensors(one_rank, make):
    assert "dist.all_reduce" in _flagged(lambda: dist.all_reduce(make()))


def test_flags_the_output_side_and_lists(one_rank):
    dev = rt.device()
    out = [torch.zeros(2, device=dev)]
    assert "dist.all_gather" in _flagged(lambda: dist.all_gather(out, torch.ones(2)))
    assert "dist.all_gather_into_tensor" in _flagged(
        lambda: dist.all_gather_into_tensor(torch.empty(2), torch.ones(2, device=dev)))


def test_passes_tensors_on_the_rank_device(one_rank):
    dev = rt.device()
    with check_collective_devices():
        dist.all_reduce(torch.tensor([1.0], device=dev))
        host = torch.tensor([3.0])
        moved = host.to(dev)
        dist.all_reduce(moved)
        dist.all_reduce(host.cuda())
        dist.all_reduce(host.to(dev, torch.float64) * 2)
        acc = torch.zeros(1, device=dev)
        acc += torch.tensor(2.0)  # in place (a 0-dim host operand is allowed): acc stays on the device
        dist.all_reduce(acc)
        with pytest.raises(AssertionError):  # moving a copy leaves the original where it was
            dist.all_reduce(host)


def test_passes_tensors_derived_from_parameters(one_rank):
    from v2pe_megatron.testing import tiny

    with check_collective_devices():
        lm = tiny.build_language_model(tiny.tiny_recipe())
        norm = torch.stack([p.detach().float().norm() for p in lm.parameters()]).sum()
        dist.all_reduce(norm)
        linear = torch.nn.Linear(2, 2).to(rt.device())  # built on the host, then moved
        x = torch.ones(1, 2, device=rt.device())
        dist.all_reduce(linear(x).detach())
        dist.all_reduce(linear.weight.data.clone())


def test_passes_megatron_gloo_groups_and_object_collectives(one_rank):
    from megatron.core import parallel_state as ps

    with check_collective_devices():
        dist.all_reduce(torch.tensor([1.0]), group=ps.get_data_parallel_group_gloo())
        dist.all_reduce(torch.tensor([1.0]), group=ps.get_data_parallel_group_gloo(with_context_parallel=True))
        objs = [None]
        dist.all_gather_object(objs, {"a": 1})
        dist.broadcast_object_list(objs, src=0)
        with pytest.raises(AssertionError, match="DATA_PARALLEL_GROUP"):  # the NCCL twin is checked
            dist.all_reduce(torch.tensor([1.0]), group=ps.get_data_parallel_group())


def test_inert_outside_and_undone_after(one_rank):
    orig, cuda = dist.all_reduce, torch.Tensor.cuda
    with check_collective_devices():
        assert dist.all_reduce is not orig
        with pytest.raises(RuntimeError, match="already active"):
            with check_collective_devices():
                pass
    assert dist.all_reduce is orig and dist.distributed_c10d.all_reduce is orig
    assert torch.Tensor.cuda is cuda
    dist.all_reduce(torch.tensor([1.0]))  # no checker: nothing to say


def _p2p() -> str:
    """2 ranks: isend/irecv and batch_isend_irecv (megatron's pipeline path) are checked too."""
    rank, dev = dist.get_rank(), rt.device()
    peer = 1 - rank
    msgs = []
    with check_collective_devices():
        good = torch.full((2,), float(rank), device=dev)
        recv = torch.empty(2, device=dev)
        ops = [dist.P2POp(dist.isend, good, peer), dist.P2POp(dist.irecv, recv, peer)]
        for w in dist.batch_isend_irecv(ops if rank == 0 else ops[::-1]):
            w.wait()
        assert recv.tolist() == [float(peer)] * 2
        for call in (lambda: dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.zeros(2), peer)]),
                     lambda: dist.isend(torch.ones(2), peer)):
            try:
                call()
            except AssertionError as e:
                msgs.append(str(e))
    return "\n".join(msgs)


@pytest.mark.slow
def test_point_to_point_two_ranks():
    for msgs in run_distributed(_p2p, 2, timeout=120):
        assert "dist.batch_isend_irecv" in msgs and "dist.isend" in msgs


def test_to_another_tensor_follows_it(one_rank):
    with check_collective_devices():
        dist.all_reduce(torch.tensor([1.0]).to(torch.ones(1, device=rt.device())))
        with pytest.raises(AssertionError):
            dist.all_reduce(torch.ones(1, device=rt.device()).to(torch.tensor([1.0])))


def _train_checked(overrides: list[str]) -> tuple[int, int, list[float]]:
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.training.loop import train

    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml", overrides)
    with check_collective_devices():
        s = train(recipe)
    return s.final_step - s.steps_run, s.final_step, s.losses


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["parallel.tp=2"], ["parallel.pp=2"]], ids=["dp2", "tp2", "pp2"])
def test_training_loop_save_and_resume_under_checker(tmp_path, layout):
    """Two ranks train, save at step 2 and stop; a second job resumes from that checkpoint and saves
    again: every collective of the loop, the schedules, the optimizer and the checkpoints is checked."""
    base = ["tracking.backend=none", f"checkpoint.dir={tmp_path / 'ckpt'}", "data.seq_length=128",
            "train.steps=3", "train.log_interval=100", *layout]
    first = run_distributed(_train_checked, 2, base + ["train.exit_after_steps=2"], timeout=300)
    assert [r[:2] for r in first] == [(0, 2)] * 2
    second = run_distributed(_train_checked, 2, base, timeout=300)
    assert [r[:2] for r in second] == [(2, 3)] * 2
    assert all(0 < x < 20 for x in first[0][2] + second[0][2])
