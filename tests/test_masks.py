"""attention_mask against a brute-force double loop over the mask rules, as README "How it works"
states them, one (query, key) pair at a time."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

import data
import model
from data import LABEL, PAD, SUM, TEXT
from conftest import dti_streams, from_histories, pad, prompt_arrays, sw_prompts
from model import attention_mask


def brute_force_mask(block, role, n, kind):
    """The rules in words, one (query, key) pair at a time. window: causal, at most n blocks back,
    never another block's [SUM]. isolated: a text or label token reads its own block up to itself;
    the [SUM] of block i reads itself, the text of block i and the text and labels of blocks
    i-n .. i-1. Every mask: a PAD query reads itself only, and nothing reads PAD."""
    T = len(block)
    allowed = np.zeros((T, T), dtype=bool)
    for q in range(T):
        for k in range(T):
            if role[q] == PAD:
                ok = k == q
            elif kind == 'window':
                ok = (k <= q and block[q] - block[k] <= n and role[k] != PAD
                      and (role[k] != SUM or k == q))
            elif role[q] == SUM:  # isolated, [SUM] of block i
                ok = (k == q or (block[k] == block[q] and role[k] == TEXT)
                      or (block[q] - n <= block[k] <= block[q] - 1 and role[k] in (TEXT, LABEL)))
            else:                 # isolated, text or label
                ok = block[k] == block[q] and k <= q and role[k] in (TEXT, LABEL)
            allowed[q, k] = ok
    return allowed


layouts = st.fixed_dictionaries(dict(
    m=st.integers(1, 12), n=st.integers(1, 4), k=st.integers(1, 5), seed=st.integers(0, 2**16),
    max_text=st.integers(1, 5), mode=st.sampled_from(['sw', 'dti'])))


def random_batch(m, n, k, seed, max_text, mode):
    rng = np.random.default_rng(seed)
    histories = [[(rng.integers(0, 1000, rng.integers(1, max_text + 1)).tolist(), int(rng.integers(0, 2)))
                  for _ in range(m + int(rng.integers(0, 4)))] for _ in range(2)]
    prompts = [p for h in histories
               for p in (sw_prompts(h, n) if mode == 'sw' else dti_streams(h, n, k))]
    if not prompts:  # too short for any target: the whole history as one prompt of context
        m = len(histories[0])
        prompts = prompt_arrays(from_histories(histories[:1]), np.array([[0, m, m]]))
    return pad(prompts)


@settings(max_examples=200, deadline=None)
@given(layouts, st.sampled_from(['window', 'isolated']))
def test_mask_matches_brute_force(layout, kind):
    b = random_batch(**layout)
    got = attention_mask(b['block'], b['role'], layout['n'], kind)             # (B, 1, T, T)
    assert got.shape == (b['idx'].size(0), 1, b['idx'].size(1), b['idx'].size(1))
    for row in range(b['idx'].size(0)):
        want = brute_force_mask(b['block'][row].tolist(), b['role'][row].tolist(), layout['n'], kind)
        assert np.array_equal(got[row, 0].numpy(), want)
    assert got.any(-1).all(), 'a fully masked row would give NaN'


def test_roles_agree_between_data_and_model():
    assert (data.TEXT, data.SUM, data.LABEL, data.PAD) == (model.TEXT, model.SUM, model.LABEL, model.PAD)


def test_nothing_reads_another_blocks_sum_and_pad_is_isolated():
    b = random_batch(m=10, n=3, k=4, seed=1, max_text=4, mode='dti')
    for kind in ('window', 'isolated'):
        allowed = attention_mask(b['block'], b['role'], 3, kind)[:, 0]         # (B, T, T)
        eye = torch.eye(allowed.size(-1), dtype=torch.bool)
        sum_key = (b['role'] == SUM)[:, None, :]
        pad_key = (b['role'] == PAD)[:, None, :]
        assert not (allowed & sum_key & ~eye).any()
        assert not (allowed & pad_key & ~eye).any()
        assert (b['role'] == PAD).any(), 'the batch must hold padding for this test to mean anything'
        assert torch.equal(allowed[b['role'] == PAD], eye.expand_as(allowed)[b['role'] == PAD])


def test_one_layer_view_of_a_sum_is_its_sliding_window():
    """Both masks give the [SUM] of block i exactly blocks i-n .. i (less [SUM]s and its own label)."""
    b = random_batch(m=12, n=3, k=5, seed=2, max_text=4, mode='dti')
    block, role = b['block'][0], b['role'][0]
    for kind in ('window', 'isolated'):
        allowed = attention_mask(b['block'], b['role'], 3, kind)[0, 0]
        for q in torch.nonzero(role == SUM).flatten().tolist():
            i = int(block[q])
            want = ((block >= i - 3) & (block <= i) & (role != SUM) & (role != PAD)
                    & ~((block == i) & (role == LABEL)))
            want[q] = True
            assert torch.equal(allowed[q], want), (kind, q)


def test_alibi_bias_is_minus_slope_times_distance_where_allowed():
    b = random_batch(m=14, n=4, k=20, seed=3, max_text=5, mode='dti')
    allowed = attention_mask(b['block'], b['role'], 4, 'isolated')             # (B, 1, T, T)
    T = allowed.size(-1)
    pos = torch.arange(T).expand(allowed.size(0), T)
    bias = model.sdpa_mask(allowed[:, 0], pos, pos, model.alibi_slopes(4))    # (B, 4, T, T)
    dist = np.subtract.outer(np.arange(T), np.arange(T))                       # q - k
    for row in range(allowed.size(0)):
        ok = allowed[row, 0].numpy()
        assert dist[ok].max() > 20, 'the layout must reach far back'
        for h in range(4):
            slope = 2.0 ** (-8.0 * (h + 1) / 4)
            np.testing.assert_allclose(bias[row, h].numpy()[ok], -slope * dist[ok], rtol=1e-6)
            assert np.all(bias[row, h].numpy()[~ok] == -np.inf)
    assert torch.equal(model.sdpa_mask(allowed[:, 0], pos, pos), allowed)
