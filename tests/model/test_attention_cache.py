"""Decoding caches (KV + LFA state): a cached forward gives the numbers of a full forward over the whole sequence,
for LFA and plain attention, for prefill, chunks and one-token steps, with rows of different lengths."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.config import ModelConfig
from moe_runtime.model.attention import CACHE_CHUNK, CacheStep, KVCache, LocalizedFilter, build_attention
from moe_runtime.model.transformer import build_model


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", **overrides)


def right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, lengths


def full_logits(model, row: torch.Tensor) -> torch.Tensor:
    """[S, V]: the model over the whole sequence, no cache (the oracle)."""
    return model(row[None]).logits[0]


# ----------------------------------------------------------------------------------------------- the filter


def test_filter_in_chunks_equals_filter_over_the_whole_sequence():
    torch.manual_seed(0)
    f = LocalizedFilter(16)
    for p in f.parameters():  # nonzero biases: the zero "previous" intermediate at the start matters
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 9, 16)
    full = f(x)
    state = torch.zeros(3, 2, 16)
    lo = 0
    got = []
    for chunk in (1, 3, 1, 4):  # the one-token prompt keeps [0, x0], as the HF code does
        step = CacheStep.build([lo] * 3, [chunk] * 3, chunk, "cpu")
        u, state = f.forward_cached(x[:, lo : lo + chunk], state, step)
        got.append(u)
        assert_close(state, x[:, max(0, lo + chunk - 2) : lo + chunk] if lo + chunk >= 2
                     else torch.cat([torch.zeros(3, 1, 16), x[:, :1]], dim=1))
        lo += chunk
    assert_close(torch.cat(got, dim=1), full)


def test_filter_rows_with_padding_keep_their_own_last_two_inputs():
    torch.manual_seed(1)
    f = LocalizedFilter(8)
    x = torch.randn(2, 4, 8)
    step = CacheStep.build([0, 0], [4, 1], 4, "cpu")
    u, state = f.forward_cached(x, torch.zeros(2, 2, 8), step)
    assert_close(u[0], f(x[:1])[0])
    assert_close(u[1, :1], f(x[1:, :1])[0])
    assert_close(state[0], x[0, 2:4])
    assert_close(state[1], torch.stack([torch.zeros(8), x[1, 0]]))


# ----------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("lfa", [True, False])
def test_attention_module_cached_steps_equal_full_attention(lfa):
    cfg = tiny(lfa=lfa)
    torch.manual_seed(2)
    attn = build_attention(cfg)
    x = torch.randn(2, 7, cfg.hidden_size)
    full = attn(x)
    cache = KVCache.allocate(cfg, 2, 3)
    layer = cache.layers[0]
    outs = []
    for lo, hi in ((0, 3), (3, 4), (4, 7)):
        step = cache.begin(torch.full((2,), hi - lo), hi - lo, "cpu")  # grows the layer caches in place
        outs.append(attn(x[:, lo:hi], layer, step))
        cache.advance(step)
    assert_close(torch.cat(outs, dim=1), full)


# ----------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("lfa,rope", [(True, "exact"), (False, "exact"), (True, "hf")])
def test_cached_logits_equal_full_recompute_for_a_batch_of_mixed_lengths(lfa, rope):
    model = build_model(tiny(lfa=lfa, rope=rope), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (5, 1, 9, 3)]
    tokens, lengths = right_padded(rows)
    with torch.no_grad():
        cache = model.new_cache(len(rows), capacity=16)
        prefill = model(tokens, cache=cache, num_new=lengths).logits
        for i, r in enumerate(rows):
            assert_close(prefill[i, : len(r)], full_logits(model, r))
        assert cache.lengths == [5, 1, 9, 3]
        for _ in range(6):  # decode: positions continue from each row's own length
            nxt = torch.randint(0, 256, (len(rows), 1), generator=g)
            step_logits = model(nxt, cache=cache).logits
            rows = [torch.cat([r, n]) for r, n in zip(rows, nxt)]
            for i, r in enumerate(rows):
                assert_close(step_logits[i, 0], full_logits(model, r)[-1])


@pytest.mark.parametrize("lfa", [True, False])
def test_chunks_of_different_lengths_per_row_continue_the_cache(lfa):
    model = build_model(tiny(lfa=lfa), seed=1).eval()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (4, 2)]
    with torch.no_grad():
        cache = model.new_cache(2, capacity=4)
        tokens, lengths = right_padded(rows)
        model(tokens, cache=cache, num_new=lengths)
        chunks = [torch.randint(0, 256, (n,), generator=g) for n in (1, 5)]
        tokens, counts = right_padded(chunks)
        out = model(tokens, cache=cache, num_new=counts, last_logits_only=True).logits
        for i, (r, c) in enumerate(zip(rows, chunks)):
            assert_close(out[i, 0], full_logits(model, torch.cat([r, c]))[-1])
    assert cache.lengths == [5, 7]


def test_padding_never_reaches_the_experts():
    cfg = tiny()
    model = build_model(cfg, seed=0).eval()
    tokens, lengths = right_padded([torch.arange(6), torch.arange(2)])
    with torch.no_grad():
        model(tokens, cache=model.new_cache(2, 8), num_new=lengths)
    assert model.expert_load().sum(dim=1).tolist() == [8 * cfg.top_k] * cfg.num_layers


def test_select_and_concat_rows_between_steps_keep_each_sequence_exact():
    model = build_model(tiny(), seed=3).eval()
    g = torch.Generator().manual_seed(3)
    a_rows = [torch.randint(0, 256, (n,), generator=g) for n in (3, 6)]
    b_rows = [torch.randint(0, 256, (4,), generator=g)]
    with torch.no_grad():
        a = model.new_cache(2, 8)
        tokens, lengths = right_padded(a_rows)
        model(tokens, cache=a, num_new=lengths)
        b = model.new_cache(1, 100)  # a different capacity: concat pads the smaller one
        model(b_rows[0][None], cache=b)
        merged = KVCache.concat([a.select([1]), b, a.select([0])])
        rows = [a_rows[1], b_rows[0], a_rows[0]]
        assert merged.lengths == [6, 4, 3]
        for _ in range(3):
            nxt = torch.randint(0, 256, (3, 1), generator=g)
            out = model(nxt, cache=merged).logits
            rows = [torch.cat([r, n]) for r, n in zip(rows, nxt)]
            for i, r in enumerate(rows):
                assert_close(out[i, 0], full_logits(model, r)[-1])


def test_cache_grows_by_doubling_in_chunks_up_to_max_seq_len_and_keeps_its_contents():
    cfg = tiny(max_seq_len=1000)
    model = build_model(cfg, seed=0).eval()
    row = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.new_cache(1, capacity=2)
        assert cache.capacity == 2
        model(row[None, :2], cache=cache)
        out = model(row[None, 2:20], cache=cache).logits  # needs 20 > 2 slots
        assert cache.capacity == CACHE_CHUNK
        assert_close(out[0], full_logits(model, row)[2:])
        cache.reserve(CACHE_CHUNK + 1)
        assert cache.capacity == 2 * CACHE_CHUNK
        cache.reserve(3 * CACHE_CHUNK + 1)
        assert cache.capacity == cfg.max_seq_len  # doubling would pass max_seq_len


def test_last_logits_only_picks_each_rows_last_real_token():
    model = build_model(tiny(), seed=0).eval()
    tokens, lengths = right_padded([torch.arange(5), torch.arange(2)])
    with torch.no_grad():
        full = model(tokens, cache=model.new_cache(2, 8), num_new=lengths).logits
        last = model(tokens, cache=model.new_cache(2, 8), num_new=lengths, last_logits_only=True).logits
        assert last.shape == (2, 1, full.shape[-1])
        assert_close(last[:, 0], full[torch.arange(2), lengths - 1])
        assert_close(model(tokens, last_logits_only=True).logits, model(tokens).logits[:, -1:])


def test_cache_follows_the_model_dtype():
    model = build_model(tiny(), seed=0).eval().to(torch.bfloat16)
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        out = model(torch.arange(3)[None], cache=cache).logits
    assert cache.layers[0].k_bhcd.dtype == torch.bfloat16 and cache.layers[0].lfa_inputs_b2d.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_clear_errors():
    cfg = tiny(max_seq_len=8)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        with pytest.raises(ValueError, match="the cache has 2"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"each must be in \[1, 2\]"):
            model(torch.zeros(2, 2, dtype=torch.long), cache=cache, num_new=torch.tensor([2, 0]))
        with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
            model(torch.zeros(2, 9, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="without a cache"):
            model(torch.zeros(2, 2, dtype=torch.long), num_new=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="needs both"):
            model.layers[0].attn(torch.zeros(1, 1, cfg.hidden_size), cache.layers[0])
        with pytest.raises(ValueError, match="rows 0..1"):
            cache.select([2])


def test_cached_filter_follows_weight_changes():
    """The conv-as-linear weight of the cached filter is rebuilt when the conv weights change (a load)."""
    torch.manual_seed(0)
    filt = LocalizedFilter(16)
    x = torch.randn(2, 5, 16)
    zeros = torch.zeros(2, 2, 16)
    step = CacheStep.build([0, 0], [5, 5], 5, "cpu")
    with torch.inference_mode():
        before, _ = filt.forward_cached(x, zeros, step)
        filt.load_state_dict({k: torch.randn_like(v) for k, v in filt.state_dict().items()})
        after, _ = filt.forward_cached(x, zeros, step)
        assert_close(after, filt(x))
    assert not torch.allclose(before, after)
