"""bSAM under DDP with two CPU processes (gloo)."""
import multiprocessing
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_workers as W
from bsam_fast import BSAM, split_batch
from bsam_fast.noise import noise_bases, normal_like, stream_seed
from helpers import make_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(W.worker_train, args=(WORLD, free_port(), str(out), "float64"), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_every_rank_holds_the_same_state(trained):
    a, b = trained[0]["state"], trained[1]["state"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ranks_share_the_seed_but_draw_their_own_noise(trained):
    assert trained[0]["seed"] == trained[1]["seed"]        # rank 0's seed was broadcast
    assert trained[0]["key"] != trained[1]["key"]
    assert trained[1]["key"] == stream_seed(trained[0]["seed"], 1)


def test_equals_one_process_with_m_times_world_parts(trained):
    """W ranks x m local parts == one process with m*W parts and the ranks' noise streams."""
    dtype = torch.float64
    net = make_model(dtype=dtype)
    params = list(net.parameters())
    opt = BSAM(params, lr=0.05, num_data=200, rho=0.05, weight_decay=0.01, seed=0)
    bases = noise_bases([p.numel() for p in params])
    seed = trained[0]["seed"]
    for t in range(W.STEPS):
        x, y = W.global_batch(t, WORLD, dtype)
        parts, noise = [], []
        for r in range(WORLD):
            local = slice(r * W.LOCAL_BATCH, (r + 1) * W.LOCAL_BATCH)
            parts += split_batch(x[local], y[local], m=W.M)
            noise += [normal_like(params, bases, stream_seed(seed, r), t * W.M + k, dtype=dtype)
                      for k in range(W.M)]

        def closure(k):
            opt.zero_grad()
            loss = F.cross_entropy(net(parts[k][0]), parts[k][1])
            loss.backward()
            return loss
        opt.step_parts(closure, W.M * WORLD, noise=noise)
    ddp_state = trained[0]["state"]
    for name, p in net.named_parameters():
        for key, value in ((name, p.detach()), (name + ".gm", opt.state[p]["momentum"]),
                           (name + ".s", opt.state[p]["precision"])):
            torch.testing.assert_close(ddp_state[key], value, rtol=1e-12, atol=1e-14, msg=key)


def test_checkpoint_on_rank0_resumes_identically(tmp_path):
    mp.spawn(W.worker_checkpoint, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        ck = torch.load(tmp_path / f"ck{r}.pt")
        for k in ck["straight"]:
            assert torch.equal(ck["straight"][k], ck["resumed"][k]), (r, k)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=W.worker_one_rank_raises, args=(r, WORLD, port, str(tmp_path)))
             for r in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert procs[1].exitcode != 0
    assert (tmp_path / "rank0.txt").read_text().startswith("error"), "rank 0 should fail, not finish"
    assert time.monotonic() - start < 120


def test_a_kept_plan_after_a_change_equals_a_fresh_optimizer_under_ddp(tmp_path):
    mp.spawn(W.worker_kept_plan, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        assert torch.load(tmp_path / f"kept{r}.pt") == {"load_state_dict": True, "storage replaced": True}
