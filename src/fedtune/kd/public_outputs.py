"""What a KD client shares about the public set: its top-k logits per public position, or, under client-level DP,
its probabilities at the server's candidate tokens (a fixed shape, so that it can be clipped and noised)."""

from __future__ import annotations

import torch

from fedtune.data.formatting import collate
from fedtune.models.flops import forward_flops


@torch.no_grad()
def public_outputs(cm, public: list[dict], ctx, topk: int, *, candidates: torch.Tensor | None = None,
                   private: bool = False, temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """``cm``'s outputs on every public position (response positions, flattened) and the forward FLOPs.

    Plain: ``values`` (fp16 top-k logits, or all with ``topk`` 0) and ``indices`` (int32). ``private``: ``probs``,
    softmax(logits / T) at ``candidates`` [P, k] (float32; None: the whole vocabulary)."""
    cm.model.eval()
    values, indices, flops, done = [], [], 0, 0
    size = ctx.cfg.eval.batch_size
    for start in range(0, len(public), size):
        batch = collate(public[start : start + size], ctx.pad_token_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        logits = cm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        flat = logits[:, :-1][batch["labels"][:, 1:] != -100].float()
        if private:
            probs = torch.softmax(flat / temperature, dim=-1)
            if candidates is not None:
                probs = probs.gather(1, candidates[done : done + flat.shape[0]].long().to(probs.device))
            values.append(probs.cpu())
        elif topk:
            top = flat.topk(min(topk, flat.shape[-1]), dim=-1)
            values.append(top.values.half().cpu())
            indices.append(top.indices.to(torch.int32).cpu())
        else:
            values.append(flat.half().cpu())
        done += flat.shape[0]
        bsz, seq = batch["input_ids"].shape
        flops += forward_flops(cm.cost, tokens=bsz * seq, seq_len=seq)
    if private:
        return {"probs": torch.cat(values)}, flops
    tensors = {"values": torch.cat(values)}
    if indices:
        tensors["indices"] = torch.cat(indices)
    return tensors, flops
