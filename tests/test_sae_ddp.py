"""Two gloo processes on halves of every global batch end where one process on the whole batch ends."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_sae.sae import SAEConfig, SyntheticSparseData, TrainConfig, train_sae

SCFG = dict(d_in=16, num_latents=64, k=3, normalize_input=True)
TCFG = dict(lr=3e-3, batch_size=512, max_tokens=30 * 512, dead_tokens_threshold=1500, seed=3, log_every=10)


def _data():
    return SyntheticSparseData(d=16, num_atoms=48, active=3, num_tokens=30 * 512, batch_size=512, seed=5)


def _worker(rank, world, store_path, out_path):
    torch.set_num_threads(1)
    # A file store, not TCP: with TCP, rank 0 hosts the store and, leaving first, could pull it from under rank 1's
    # teardown (one CI run saw rank 1 abort with "terminate called without an active exception" there).
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        sae = train_sae(SAEConfig(**SCFG), _data(), TrainConfig(**TCFG), progress=False)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in sae.state_dict().items()}, out_path)
        # Both ranks leave together: a rank tearing gloo down while the other still talks aborts it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    single = train_sae(SAEConfig(**SCFG), _data(), TrainConfig(**TCFG), progress=False)
    out = tmp_path / "ddp.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True, start_method="spawn")
    ddp = torch.load(out, weights_only=True)
    for name, v in single.state_dict().items():
        torch.testing.assert_close(ddp[name], v, rtol=1e-4, atol=2e-5)
    # and the run really moved away from the init
    assert float((single.W_dec - type(single)(cfg=SAEConfig(**SCFG), seed=3).W_dec).abs().max()) > 1e-2
