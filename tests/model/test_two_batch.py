"""Two-batch overlap in process: the pipelined halves give model.loss on the whole micro-batch (loss, cross
entropy, aux loss over the whole batch, expert load, every gradient), for every routing rule with an aux loss."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.config import parse_config
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.transformer import build_model
from moe_runtime.model.two_batch import half_context, split_rows, two_batch_loss


def _model(**model):
    cfg = parse_config({"model": {"preset": "tiny", **model}}).model
    return build_model(cfg, seed=3), cfg


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _two_batch_matches(model, tokens, targets, loss, ce, **kw):
    """two_batch_loss after model.loss's backward (`loss`, `ce`): the same loss, cross entropy and every gradient."""
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    out = two_batch_loss(model, tokens, targets, **kw)
    out.loss.backward()
    assert_close(out.loss, loss)
    assert_close(out.ce, ce)
    got = _grads(model)
    assert set(got) == set(ref)
    for k in ref:
        assert_close(got[k], ref[k], msg=k)
    return out


@pytest.mark.parametrize("model_kw", [
    {"aux_loss_coeff": 0.01},
    {"aux_loss_coeff": 0.01, "router": "linear"},
    {"aux_loss_coeff": 0.01, "routing": "top_p", "top_p": 0.6, "k_max": 3, "dynamic_loss_coeff": 0.005},
], ids=["attention-topk", "linear-topk", "top_p"])
@pytest.mark.parametrize("rows", [2, 3])
def test_two_batch_equals_whole_micro_batch(model_kw, rows):
    model, cfg = _model(**model_kw)
    g = torch.Generator().manual_seed(rows)
    tokens = torch.randint(0, cfg.vocab_size, (rows, 24), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (rows, 24), generator=g)
    loss, ce = model.loss(tokens, targets)
    load = model.expert_load()
    loss.backward()
    out = _two_batch_matches(model, tokens, targets, loss, ce)
    assert float((loss - ce).detach()) > 0  # the aux loss is on, so the whole-batch aux formula is exercised
    assert_close(out.loss - out.ce, loss - ce)
    assert torch.equal(out.load_le, load)


def test_one_row_runs_whole():
    model, cfg = _model()
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    loss, _ = model.loss(tokens, tokens)
    assert_close(two_batch_loss(model, tokens, tokens).loss, loss)


def test_halves_and_contexts():
    assert split_rows(1) is None
    assert split_rows(4) == (slice(0, 2), slice(2, 4))
    assert split_rows(5) == (slice(0, 3), slice(3, 5))
    assert half_context(StepContext(7, 3), 1) == StepContext(7, 7)
    assert half_context(None, 0) is None


def test_bad_shapes_name_the_problem():
    model, cfg = _model()
    with pytest.raises(ValueError, match=r"tokens \[2, 8\] and targets \[2, 9\]"):
        two_batch_loss(model, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long))
    long = torch.zeros(2, cfg.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        two_batch_loss(model, long, long)


def _packed_documents(rows: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """documents_bs / positions_bs of rows packed with documents of random lengths (positions restart per
    document, as data.source files with reset_position_ids)."""
    docs = torch.zeros(rows, seq, dtype=torch.long)
    pos = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randint(1, seq, (3,), generator=g).tolist())
        for i, (a, b) in enumerate(zip([0] + cuts, cuts + [seq])):
            docs[r, a:b] = i
            pos[r, a:b] = torch.arange(b - a)
    return docs, pos


@pytest.mark.parametrize("with_positions", [True, False], ids=["positions", "mask-only"])
@pytest.mark.parametrize("rows", [2, 5])
def test_two_batch_with_document_masks_equals_whole(rows, with_positions):
    model, cfg = _model(aux_loss_coeff=0.01)
    g = torch.Generator().manual_seed(40 + rows)
    tokens = torch.randint(0, cfg.vocab_size, (rows, 24), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (rows, 24), generator=g)
    docs, pos = _packed_documents(rows, 24, g)
    kw = {"documents_bs": docs, "positions_bs": pos if with_positions else None}
    loss, ce = model.loss(tokens, targets, **kw)
    plain, _ = model.loss(tokens, targets)
    assert not torch.allclose(loss, plain)  # the masks change the result: the test can tell them apart
    loss.backward()
    _two_batch_matches(model, tokens, targets, loss, ce, **kw)


def test_bad_documents_name_the_problem():
    model, cfg = _model()
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"documents has shape \[2, 7\]: expected the tokens' \[2, 8\]"):
        two_batch_loss(model, tokens, tokens, documents_bs=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="positions without documents"):
        two_batch_loss(model, tokens, tokens, positions_bs=torch.zeros(2, 8, dtype=torch.long))
    far = torch.full((2, 8), cfg.max_seq_len, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        two_batch_loss(model, tokens, tokens, documents_bs=torch.zeros(2, 8, dtype=torch.long), positions_bs=far)
