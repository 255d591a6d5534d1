"""What the paper claims, proved on a real (tiny, random) model: no future leakage under any mask,
no leakage past the window under `isolated` at any depth, hidden-state leakage under `window`
with two or more layers, and DTI == SW (to 1e-5) under `isolated` + ALiBi."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
from conftest import DEVICES, dti_streams, pad, random_history, small_model, sw_prompts, target_logits
from data import PAD, SUM
from model import ctr_loss

MASKS_AND_POSITIONS = [(m, p) for m in ('isolated', 'window') for p in ('alibi', 'learned')]


def sum_positions(prompt):
    return np.flatnonzero(prompt['role'] == SUM)


def logit_at(model, prompt, q):
    b = pad([prompt])
    with torch.no_grad():
        return float(model(b['idx'], b['block'], b['role'])[0, q])


def perturbed(prompt, positions, rng):
    """The prompt with every token at `positions` replaced by another id (labels swap yes <-> no)."""
    p = {key: v.copy() for key, v in prompt.items()}
    for t in positions:
        if p['idx'][t] in (data.YES_ID, data.NO_ID):
            p['idx'][t] = data.NO_ID if p['idx'][t] == data.YES_ID else data.YES_ID
        else:
            p['idx'][t] = (p['idx'][t] + 1 + rng.integers(0, 999)) % 1000
    return p


@pytest.mark.parametrize('mask,pos', MASKS_AND_POSITIONS)
def test_no_nan_anywhere_padding_included(mask, pos, rng):
    model = small_model(n=3, mask=mask, pos=pos, n_layer=2).train()
    prompts = dti_streams(random_history(rng, 14), 3, 4) + sw_prompts(random_history(rng, 6), 3)
    b = pad(prompts)
    assert (b['role'] == PAD).any()
    logits = model(b['idx'], b['block'], b['role'])
    assert torch.isfinite(logits).all()
    ctr_loss(logits, b['label']).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('mask,pos', MASKS_AND_POSITIONS)
@pytest.mark.parametrize('n_layer', [1, 2, 3, 4])
def test_no_future_leakage(mask, pos, n_layer, rng):
    """Changing anything after a target's [SUM], its own label included, leaves its logit alone."""
    model = small_model(n=2, mask=mask, pos=pos, n_layer=n_layer)
    stream = dti_streams(random_history(rng, 9), 2, 7)[0]
    own_text_moves = []
    for q in sum_positions(stream):
        after = range(q + 1, len(stream['idx']))
        before = logit_at(model, stream, q)
        assert abs(logit_at(model, perturbed(stream, after, rng), q) - before) < 1e-6, q
        # the check has teeth: changing the target's own text does move its logit
        own_text = np.flatnonzero((stream['block'] == stream['block'][q]) & (np.arange(len(stream['idx'])) < q))
        own_text_moves.append(abs(logit_at(model, perturbed(stream, own_text, rng), q) - before))
    assert max(own_text_moves) > 1e-2


def older_than_window(prompt, q, n):
    return np.flatnonzero(prompt['block'] < prompt['block'][q] - n)


@pytest.mark.parametrize('pos', ['alibi', 'learned'])
@pytest.mark.parametrize('n_layer', [1, 2, 3, 4])
def test_isolated_never_sees_past_the_window(pos, n_layer, rng):
    n = 2
    model = small_model(n=n, mask='isolated', pos=pos, n_layer=n_layer)
    stream = dti_streams(random_history(rng, 12), n, 10)[0]
    checked = 0
    for q in sum_positions(stream):
        old = older_than_window(stream, q, n)
        if len(old):
            before = logit_at(model, stream, q)
            assert abs(logit_at(model, perturbed(stream, old, rng), q) - before) < 1e-6, q
            checked += 1
    assert checked >= 5


def max_change_past_window(model, stream, n, rng):
    changes = [abs(logit_at(model, perturbed(stream, older_than_window(stream, q, n), rng), q)
                   - logit_at(model, stream, q))
               for q in sum_positions(stream) if len(older_than_window(stream, q, n))]
    return max(changes)


@pytest.mark.parametrize('pos', ['alibi', 'learned'])
def test_window_leaks_through_hidden_states_from_two_layers_on(pos, rng):
    n = 2
    stream = dti_streams(random_history(rng, 12), n, 10)[0]
    one = max_change_past_window(small_model(n=n, mask='window', pos=pos, n_layer=1), stream, n, rng)
    assert one < 1e-6, 'with one layer the window mask is exactly the sliding window'
    for n_layer in (2, 3, 4):
        leak = max_change_past_window(small_model(n=n, mask='window', pos=pos, n_layer=n_layer), stream, n, rng)
        assert leak > 1e-2, f'{n_layer} layers: hidden-state leakage should be clearly visible, got {leak}'


def sw_and_dti_logits(model, history, n, k):
    sw = target_logits(model, sw_prompts(history, n))
    dti = target_logits(model, dti_streams(history, n, k))
    assert sw.shape == dti.shape == (len(history) - n,)
    return sw, dti


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 12), m_extra=st.integers(1, 25), max_text=st.integers(1, 8),
       seed=st.integers(0, 2**16), n_layer=st.integers(1, 3))
@pytest.mark.parametrize('device', DEVICES)
def test_dti_equals_sw_under_isolated_alibi(device, n, k, m_extra, max_text, seed, n_layer):
    rng = np.random.default_rng(seed)
    model = small_model(n=n, mask='isolated', pos='alibi', n_layer=n_layer, seed=seed).to(device)
    sw, dti = sw_and_dti_logits(model, random_history(rng, n + m_extra, max_text), n, k)
    torch.testing.assert_close(dti, sw, atol=1e-5, rtol=0)


def test_dti_equals_sw_under_window_with_one_layer_only(rng):
    history = random_history(rng, 20)
    sw, dti = sw_and_dti_logits(small_model(n=3, mask='window', n_layer=1), history, 3, 8)
    torch.testing.assert_close(dti, sw, atol=1e-5, rtol=0)
    sw, dti = sw_and_dti_logits(small_model(n=3, mask='window', n_layer=2), history, 3, 8)
    assert (dti - sw).abs().max() > 1e-2, 'two window layers leak, so DTI should differ from SW'


def test_dti_differs_from_sw_with_learned_positions(rng):
    """Positional bias: a target sits at another absolute position in a stream than in its SW
    prompt, so even the exact `isolated` mask cannot make the two agree with learned positions."""
    sw, dti = sw_and_dti_logits(small_model(n=3, mask='isolated', pos='learned'), random_history(rng, 20), 3, 8)
    assert (dti - sw).abs().max() > 1e-2


def test_only_target_sums_carry_loss_and_gradient(rng):
    model = small_model(n=2, mask='window', n_layer=2).train()
    b = pad(dti_streams(random_history(rng, 11), 2, 4))
    logits = model(b['idx'], b['block'], b['role'])
    logits.retain_grad()
    loss = ctr_loss(logits, b['label'])
    loss.backward()
    target = b['label'] >= 0
    assert torch.equal(logits.grad != 0, target)
    assert ((b['role'] == SUM) & ~target).any(), 'context [SUM]s exist but carry no loss'
    # the loss is the mean BCE over exactly those positions
    p = torch.sigmoid(logits[target].detach())
    y = b['label'][target].float()
    want = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert abs(loss.item() - want.item()) < 1e-5
