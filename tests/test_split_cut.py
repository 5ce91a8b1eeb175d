"""The cut: split forward and backward equal the whole model's, for every valid cut of each family."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import LoraConfig, ModelConfig, TinyModelConfig
from fedtune.models.loading import load_model
from fedtune.models.lora import attach_lora
from fedtune.split.cut import Cut, CutError, SplitModel

LAYERS = 4


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def tiny(request):
    cfg = ModelConfig(source="tiny", tiny=TinyModelConfig(arch=request.param, num_layers=LAYERS, vocab_size=300))
    base, tokenizer = load_model(cfg, torch.device("cpu"))
    model = attach_lora(base, LoraConfig(r=4, dropout=0.0), seed=1)
    # LoRA B starts at zero: perturb it so the adapters change the output and receive gradients
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _whole(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), _lora_grads(model)


def _split(model, cut: Cut, ids, mask, labels):
    """The split protocol in miniature: detach at every interface, pass gradients back by hand."""
    split = SplitModel(model)
    L = split.num_layers
    model.zero_grad(set_to_none=True)
    act = split.run(0, cut.head, input_ids=ids, attention_mask=mask)
    server_in = act.detach().requires_grad_()
    if cut.tail == 0:
        out = split.run(cut.head, L, hidden=server_in, attention_mask=mask, labels=labels)
        out.loss.backward()
    else:
        body = split.run(cut.head, L - cut.tail, hidden=server_in, attention_mask=mask)
        tail_in = body.detach().requires_grad_()
        out = split.run(L - cut.tail, L, hidden=tail_in, attention_mask=mask, labels=labels)
        out.loss.backward()
        body.backward(tail_in.grad)
    act.backward(server_in.grad)
    return out.logits.detach(), out.loss.detach(), _lora_grads(model)


CUTS = [Cut(k, m) for k in range(1, LAYERS) for m in range(0, LAYERS) if k + m < LAYERS]


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"head{c.head}-tail{c.tail}")
def test_split_equals_whole_model(tiny, cut):
    ids, mask, labels = _batch()
    logits, loss, grads = _whole(tiny, ids, mask, labels)
    s_logits, s_loss, s_grads = _split(tiny, cut, ids, mask, labels)
    valid = mask.bool()
    torch.testing.assert_close(s_logits[valid], logits[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == s_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(s_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_block_list_is_restored_after_a_slice(tiny):
    split = SplitModel(tiny)
    before = list(split.blocks)
    ids, mask, _ = _batch()
    split.run(0, 2, input_ids=ids, attention_mask=mask)
    _, _, blocks, _ = __import__("fedtune.split.cut", fromlist=["find_blocks"]).find_blocks(tiny)
    assert list(blocks) == before and len(blocks) == LAYERS


@pytest.mark.parametrize("cut, message", [
    (Cut(0), "at least 1 block"),
    (Cut(LAYERS), "server would run none"),
    (Cut(LAYERS + 2), "server would run none"),
    (Cut(2, 2), "overlap"),
    (Cut(3, 1), "overlap"),
    (Cut(1, -1), ">= 0"),
])
def test_impossible_cuts_are_refused(cut, message):
    with pytest.raises(CutError, match=message):
        cut.check(LAYERS)


def test_client_and_body_blocks():
    cut = Cut(2, 1).check(6)
    assert cut.client_blocks(6) == [0, 1, 5]
    assert list(cut.body(6)) == [2, 3, 4]
