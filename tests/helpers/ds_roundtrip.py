"""Save a tiny DeepSpeed checkpoint (each ZeRO stage in argv[2:]) with trainers.checkpoint.save and load it back
with trainers.checkpoint.load (weights_only), in one process on the CPU; then consolidate it (export) and,
for ZeRO >= 1, convert it to the universal format and load that. Prints `ok <stage>` for each stage."""

from __future__ import annotations

import os
import sys
import warnings

warnings.simplefilter("ignore")
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("MASTER_PORT", "29561")

import torch  # noqa: E402


def engine(stage: int, universal: bool = False):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
           "checkpoint": {"load_universal": universal}}
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    return eng


def main(root: str, stages: list[int]) -> None:
    import deepspeed

    # a file rendezvous: no port to listen on, so no port another process may have taken
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in stages:
        round_trip(f"{root}/zero{stage}", stage)


def round_trip(folder: str, stage: int) -> None:
    from trainers import checkpoint as ckpt
    from trainers.export import consolidated_state_dict

    eng = engine(stage)
    for _ in range(2):
        eng.backward(eng(torch.randn(2, 4)).pow(2).sum())
        eng.step()
    saved = {k: v.detach().clone() for k, v in eng.module.state_dict().items()} if stage < 3 else None
    state = ckpt.TrainState(step=2, data={"epoch": 1, "cursor": 5}, rng=ckpt.capture_rng(), wandb_run_id="w")
    ckpt.save(eng, folder, state, rank=0)
    after_save = torch.rand(3)
    fresh = engine(stage)
    mine, data_states = ckpt.load(fresh, folder, rank=0)
    assert mine.step == 2 and data_states == [{"epoch": 1, "cursor": 5}], (mine, data_states)
    assert torch.equal(torch.rand(3), after_save), "RNG state not restored"
    if saved is not None:
        for k, v in fresh.module.state_dict().items():
            assert torch.equal(v, saved[k]), k
    weights = consolidated_state_dict(folder)
    assert set(weights) == {"0.weight", "0.bias", "1.weight", "1.bias"}, sorted(weights)
    if stage >= 1:
        out = ckpt.to_universal(folder, __import__("pathlib").Path(folder) / "universal")
        ckpt.load(engine(stage, universal=True), folder, rank=0, universal=out)
    print(f"ok {stage}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]])
