"""Run under torchrun with 2 ranks: stage 1 under ZeRO-3, one training step, then dev decoding
as the trainer does it (``Stage1.translator``), with the ranks decoding different numbers of
steps. Under ZeRO-3's hooks every decoding step would gather the weights again, a collective
the rank that stops first never joins: the process group's 60 s timeout would turn that hang
into a failure. Usage: zero3_decode.py SHARDS TOKENIZER OUT; rank 0 writes OUT/result.json.
"""
import json
import sys
from pathlib import Path

import torch

from fla_ds.config import load_config
from fla_ds.distributed import gathered, init_distributed, shutdown
from fla_ds.engine import fill_ds_config, load_ds_config
from fla_ds.stage1 import Stage1


def main():
    shards, tokenizer, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    placement = init_distributed(timeout_s=60)
    cfg = load_config(None, [f"stream.shards={shards}", f"train.tokenizer={tokenizer}", f"train.out={out / 'run'}", "visual.out_dim=16",
                             "light_t.d_model=16", "light_t.heads=2", "light_t.encoder_layers=1", "light_t.decoder_layers=1", "light_t.ffn=32",
                             "light_t.adapter_hidden=16", "light_t.dropout=0", "train.micro_batch=1", "train.global_batch=2"])
    import deepspeed

    stage = Stage1(cfg, placement.rank)
    stage.prepare()
    ds_config = fill_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, placement.world_size, cfg.light_t.d_model)
    model = stage.build(ds_config, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    torch.manual_seed(placement.rank)
    video = torch.randint(0, 255, (1, 3, 28, 28, 3), dtype=torch.uint8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    frame_index = torch.arange(3)
    targets = torch.tensor([[stage.vocab.bos_id, 5, 6, stage.vocab.eos_id]])
    loss, n = engine(stage.augment.model_input(video, None), mask, targets, frame_index=frame_index)
    engine.backward(loss / n)
    engine.step()

    engine.eval()
    translator = stage.translator(engine)
    with gathered(engine.module.parameters()):
        live = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    copy = translator.model.state_dict()
    same = sorted(live) == sorted(copy) and all(torch.equal(live[k], copy[k]) for k in live)
    features = stage.augment.model_input(video, None)
    steps = 12 if placement.rank == 0 else 2  # rank 1 stops long before rank 0
    hypotheses = translator.model.generate(features, mask, beam_size=2, max_len=steps)
    if placement.rank == 0:
        (out / "result.json").write_text(json.dumps({"same_weights": same, "hooked": translator.model is engine.module,
                                                     "hypotheses": hypotheses, "refreshed_at": stage.replica_step,
                                                     "step": engine.global_steps}))
    shutdown()


if __name__ == "__main__":
    main()
