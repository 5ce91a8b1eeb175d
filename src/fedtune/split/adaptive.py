"""SplitFT's adaptive cut rule: better-scoring clients take more blocks, worse ones fewer."""

from __future__ import annotations


def adapt_cuts(cuts: dict[int, int], scores: dict[int, float], *, gamma: float, num_layers: int,
               max_blocks: dict[int, int]) -> dict[int, int]:
    """New cut per scored client: ``k + round(gamma * (score - mean) / |mean| * L)``, clipped to
    ``[1, max_blocks[client]]`` (the caller folds the device capacity and ``L - 1 - tail`` into it).

    ``score`` is a validation quality (higher is better). With equal scores, or a zero mean, cuts stay.
    """
    if not scores:
        return dict(cuts)
    mean = sum(scores.values()) / len(scores)
    out = dict(cuts)
    if mean == 0:
        return out
    for cid, score in scores.items():
        delta = round(gamma * (score - mean) / abs(mean) * num_layers)
        out[cid] = max(1, min(max_blocks[cid], cuts[cid] + delta))
    return out
