"""Two CPU processes (gloo; DDP and FSDP2) reproduce the single-process run on the same global batch, and resume exactly."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmfuse.engine.packing import Image, pack
from mmfuse.engine.train import TrainConfig, Trainer
from mmfuse.models.decoder import Decoder, DecoderConfig
from mmfuse.models.fusion import FusionConfig, LlamaFusion

FUSION = FusionConfig(latent_channels=2, latent_size=4, patch_size=2, boi_token_id=1, eoi_token_id=2, train_text=True,
                      timestep_dim=32)
ROWS, STEPS = 4, 3


def build_model() -> LlamaFusion:
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=20, dim=32, hidden_dim=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                    head_dim=16, tie_embeddings=True))
    return LlamaFusion.from_decoder(decoder, FUSION)


def global_batch(step: int):
    """ROWS rows of one ``<draw> <digit> BOI [image] EOI`` document each, with the noise to use."""
    gen = torch.Generator().manual_seed(step)
    docs = [[[3, 4 + int(torch.randint(0, 10, (1,), generator=gen))], Image(torch.randn(2, 4, 4, generator=gen))]
            for _ in range(ROWS)]
    batch = pack(docs, row_len=8, tokens_per_image=FUSION.patches_per_image, boi_token_id=1, eoi_token_id=2)
    assert batch.input_ids.shape[0] == ROWS  # one document per row: every shard holds equal token counts
    batch.extra = {"noise": torch.randn(batch.images.shape, generator=gen),
                   "timesteps": torch.randint(0, FUSION.num_train_timesteps, (ROWS,), generator=gen)}
    return batch


def shard(batch, rank: int, world: int):
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    fields = {k: v[rows] for k, v in batch.__dict__.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == ROWS}
    return type(batch)(**{**batch.__dict__, **fields, "extra": {k: v[rows] for k, v in batch.extra.items()}})


def make_trainer(rank: int, world: int, data_parallel: str, out_dir: str | None = None) -> Trainer:
    model = build_model()

    def loss_fn(batch, generator):
        return model.training_loss(batch, generator)  # the batch carries its noise and timesteps

    # Two micro-batches per step: the first must skip the gradient sync, the second run it.
    config = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=1, grad_clip=1.0, grad_accum=2, ema_decay=0.5,
                         data_parallel=data_parallel, out_dir=out_dir, checkpoint_every=2 if out_dir else 0)
    return Trainer(model, loss_fn, lambda step, micro: shard(global_batch(2 * step + micro), rank, world), config,
                   blocks=list(model.decoder.layers))


def run_training(rank: int, world: int, data_parallel: str = "ddp") -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer = make_trainer(rank, world, data_parallel)
    history = trainer.train(progress=False)
    return [r["loss"] for r in history], {k: v.detach().clone() for k, v in trainer.ema_state_dict().items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str, data_parallel: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = make_trainer(rank, world, data_parallel, out_dir=os.path.join(out_dir, "run"))
        losses = [r["loss"] for r in trainer.train(progress=False)]
        state = trainer.ema_state_dict()  # a collective under FSDP: every rank gathers
        # Resume from the step-2 checkpoint (gathered on save, re-sharded on load) and redo step 3.
        resumed = make_trainer(rank, world, data_parallel)
        resumed.load_checkpoint(os.path.join(out_dir, "run", "step_0000002"))
        resumed_loss = resumed.train_step()["loss"]
        resumed_state = resumed.ema_state_dict()
        if rank == 0:
            from safetensors.torch import save_file

            save_file(_cpu(state), os.path.join(out_dir, "state.safetensors"))
            save_file(_cpu(resumed_state), os.path.join(out_dir, "resumed.safetensors"))
            with open(os.path.join(out_dir, "losses.json"), "w") as f:
                json.dump({"losses": losses, "resumed_last": resumed_loss}, f)
        dist.barrier()  # no rank tears the group down while another still has work in flight
    finally:
        dist.destroy_process_group()


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, data_parallel):
    from safetensors.torch import load_file

    want_losses, want_state = run_training(0, 1)
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), data_parallel), nprocs=2,
                       join=True, start_method="spawn")
    got = json.loads((tmp_path / "losses.json").read_text())
    got_state = load_file(tmp_path / "state.safetensors")
    assert len(got["losses"]) == STEPS
    for got_loss, want in zip(got["losses"], want_losses):
        assert abs(got_loss - want) <= 1e-5 * abs(want)
    assert want_losses[0] != want_losses[-1]  # the parameters did move
    # The all-reduce sums the two halves' gradients in another order than one process does. Adam
    # divides by sqrt(v), so for a near-zero gradient that rounding difference can move a weight by a
    # fraction of lr (3e-3) per step: the bound is a few percent of one step, far below a real error.
    # The state is the EMA weights: their gathering (FSDP) is checked as well.
    assert set(got_state) == set(want_state)
    for name, want in want_state.items():
        torch.testing.assert_close(got_state[name], want, rtol=0, atol=1e-4, msg=name)
    # Resuming the distributed run from its checkpoint reproduces it exactly: weights, Adam moments
    # and EMA went through gather -> file -> (re-)shard without a bit changing.
    assert got["resumed_last"] == got["losses"][-1]
    resumed = load_file(tmp_path / "resumed.safetensors")
    for name, value in got_state.items():
        assert torch.equal(resumed[name], value), name
