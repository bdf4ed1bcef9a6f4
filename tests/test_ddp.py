"""DistributedDataParallel on CPU with gloo, 2 processes: a model holding an int8 conv and a
block-sparse Linear trains in lockstep and matches single-process training on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from accel import QuantConv2d, SparseLinear

STEPS, BATCH = 3, 8


def _model():
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1))  # frozen int8 feature extractor
    fc = SparseLinear.from_dense(nn.Linear(8 * 8 * 8, 64), sparsity=0.75, block=16, mode="sparse")
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc, nn.ReLU(), nn.Linear(64, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 2 * BATCH, 3, 8, 8, generator=g), torch.randint(0, 4, (STEPS, 2 * BATCH), generator=g)


def _train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ddp = nn.parallel.DistributedDataParallel(_model())
    xs, ys = _data()
    sl = slice(rank * BATCH, (rank + 1) * BATCH)
    _train(ddp, xs[:, sl], ys[:, sl])
    torch.save({k: v.detach().clone() for k, v in ddp.module.state_dict().items() if isinstance(v, torch.Tensor)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_gloo_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = _model()
    xs, ys = _data()
    _train(single, xs, ys)  # the whole batch at once: DDP averages the two halves' gradients
    ref = single.state_dict()
    for k in r0:  # (act_scale is NaN: unset in dynamic mode)
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, equal_nan=True, msg=k)
        torch.testing.assert_close(r0[k], ref[k], atol=1e-5, rtol=1e-4, equal_nan=True, msg=k)
    assert not torch.equal(r0["3.values"], _model().state_dict()["3.values"])  # it trained
