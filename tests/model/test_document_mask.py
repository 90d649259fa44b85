"""Document masks of packed rows (model/attention.py DocumentMask, MoETransformer.forward(documents_bs=...,
positions_bs=...)): plain attention gives each document's logits as if it ran alone; LFA matches a transcription
of the official HF code (`_prepare_decoder_attention_mask_training` + a filter over the whole row)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_runtime.config import ModelConfig
from moe_runtime.data_files import document_ids, positions_in_documents
from moe_runtime.model.attention import apply_partial_rope_at
from moe_runtime.model.transformer import build_model

EOD = 257
TOL = {"rtol": 1e-6, "atol": 1e-8}  # float64 model, but the routers score in float32 (as the official router does)


def model64(**overrides):
    m = build_model(ModelConfig(preset="tiny", **overrides), seed=3).double().eval()
    return m


def packed_rows() -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Two rows of 24 tokens, each a concatenation of documents (each but the last ending in <eod>)."""
    g = torch.Generator().manual_seed(0)

    def doc(n: int, eod: bool = True) -> list[int]:
        return torch.randint(0, 256, (n,), generator=g).tolist() + ([EOD] if eod else [])

    rows = [[doc(6), doc(9), doc(7, eod=False)], [doc(3), doc(1), doc(18, eod=False)]]
    return torch.tensor([sum(r, []) for r in rows]), rows


@torch.no_grad()
def test_packed_rows_equal_each_document_alone():
    model = model64(lfa=False)
    tokens, rows = packed_rows()
    docs = document_ids(tokens, EOD)
    logits = model(tokens, documents_bs=docs, positions_bs=positions_in_documents(docs)).logits
    for b, row in enumerate(rows):
        alone = torch.cat([model(torch.tensor([d])).logits[0] for d in row])
        torch.testing.assert_close(logits[b], alone, **TOL)
    assert not torch.allclose(logits, model(tokens).logits)  # without the mask documents see each other


@torch.no_grad()
def test_continuous_positions_equal_the_document_at_its_offset():
    """data.reset_positions: false (the HF inference code): a document keeps its row positions."""
    model = model64(lfa=False)
    tokens, rows = packed_rows()
    logits = model(tokens, documents_bs=document_ids(tokens, EOD)).logits
    for b, row in enumerate(rows):
        start = 0
        for d in row:
            n = len(d)
            alone = model(torch.tensor([d]), documents_bs=torch.zeros(1, n, dtype=torch.long),
                          positions_bs=torch.arange(start, start + n)[None]).logits[0]
            torch.testing.assert_close(logits[b, start:start + n], alone, **TOL)
            start += n


def hf_masks_and_positions(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A transcription of YuanModel._prepare_decoder_attention_mask_training (reset_attention_mask and
    reset_position_ids true): a [B, 1, S, S] 0/1 mask and the reset positions."""
    b, s = tokens.shape
    mask = torch.tril(torch.ones(b, s, s)).view(b, 1, s, s)
    positions = torch.arange(s).unsqueeze(0).expand(b, s).clone()
    for r in range(b):
        eod_index = positions[r, tokens[r] == eod].clone()
        prev = 0
        for i in eod_index.tolist():
            mask[r, 0, i + 1:, : i + 1] = 0
            positions[r, i + 1:] -= i + 1 - prev
            prev = i + 1
    return mask, positions


@torch.no_grad()
def reference_lfa_logits(model, tokens: torch.Tensor, reset_positions: bool) -> torch.Tensor:
    """The HF training forward: the LFA filter over the whole row (not reset at <eod>), an additive attention
    mask of finfo.min where the 0/1 mask is 0, softmax over keys."""
    mask01, hf_pos = hf_masks_and_positions(tokens, EOD)
    b, s = tokens.shape
    pos = hf_pos if reset_positions else torch.arange(s).expand(b, s)
    inverted = 1 - mask01.double()
    additive = inverted.masked_fill(inverted.bool(), torch.finfo(torch.float64).min)
    x = model.embed(tokens)
    for layer in model.layers:
        att = layer.attn
        h_, dh = att.num_heads, att.head_dim
        a = layer.attn_norm(x)
        u = att.lfa(a)
        v = att.v_proj(a).view(b, s, h_, dh).transpose(1, 2)
        qk = att.qk_proj(u).view(b, s, h_, 2 * dh)
        q, k = (t.transpose(1, 2) for t in qk.split(dh, dim=-1))
        cos, sin = att.rotary(s, q.device)
        q = apply_partial_rope_at(q, cos.double(), sin.double(), pos, att.rotary_dim)
        k = apply_partial_rope_at(k, cos.double(), sin.double(), pos, att.rotary_dim)
        w = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5 + additive, dim=-1)
        h = x + att.o_proj((w @ v).transpose(1, 2).reshape(b, s, h_ * dh))
        y, _ = layer.moe(layer.moe_norm(h))
        x = h + y
    return F.linear(model.final_norm(x), model.embed.weight)


@pytest.mark.parametrize("reset_positions", [False, True])
@torch.no_grad()
def test_lfa_packed_rows_match_the_hf_training_forward(reset_positions):
    model = model64()
    tokens, rows = packed_rows()
    docs = document_ids(tokens, EOD)
    _, hf_pos = hf_masks_and_positions(tokens, EOD)
    assert torch.equal(positions_in_documents(docs), hf_pos)
    pos = positions_in_documents(docs) if reset_positions else None
    logits = model(tokens, documents_bs=docs, positions_bs=pos).logits
    torch.testing.assert_close(logits, reference_lfa_logits(model, tokens, reset_positions), **TOL)
    first = len(rows[0][0])
    torch.testing.assert_close(logits[0, :first], model(torch.tensor([rows[0][0]])).logits[0], **TOL)  # causal
    second_alone = model(torch.tensor([rows[0][1]])).logits[0]
    assert not torch.allclose(logits[0, first:first + len(rows[0][1])], second_alone)  # the filter crosses <eod>


def test_loss_gradients_flow_through_the_mask():
    model = model64(lfa=False)
    tokens, _ = packed_rows()
    docs = document_ids(tokens, EOD)
    loss, ce = model.loss(tokens[:, :-1], tokens[:, 1:], documents_bs=docs[:, :-1])
    loss.backward()
    assert torch.isfinite(ce) and model.embed.weight.grad.abs().sum() > 0


def test_bad_document_arguments():
    model = model64(lfa=False)
    tokens, _ = packed_rows()
    docs = document_ids(tokens, EOD)
    with pytest.raises(ValueError, match="documents has shape"):
        model(tokens, documents_bs=docs[:, :5])
    with pytest.raises(ValueError, match="positions without documents"):
        model(tokens, positions_bs=docs)
    with pytest.raises(ValueError, match="positions has shape"):
        model(tokens, documents_bs=docs, positions_bs=docs[:1])
    with torch.no_grad(), pytest.raises(ValueError, match="full-sequence forward"):
        model(tokens, cache=model.new_cache(2, 32), documents_bs=docs)
