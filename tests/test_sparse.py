"""The block-sparse attention path against the dense reference: same outputs and gradients."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import model
from conftest import DEVICES, dti_streams, pad, random_history, small_model, sw_prompts


def sparse_and_dense_runs(n, k, m, max_text, mask, pos, n_layer, tile, mode, seed, dtype, std, device='cpu'):
    """Logits and every parameter's gradient from the sparse path and from the dense reference,
    same weights, same padded batch of SW prompts or DTI streams, on `device`."""
    rng = np.random.default_rng(seed)
    histories = [random_history(rng, n + m, max_text), random_history(rng, n + max(1, m // 3), max_text)]
    prompts = [p for h in histories for p in (sw_prompts(h, n) if mode == 'sw' else dti_streams(h, n, k))]
    prompts = [prompts[i] for i in rng.permutation(len(prompts))[:6]]
    b = {key: v.to(device) for key, v in pad(prompts).items()}
    sparse = small_model(n=n, mask=mask, pos=pos, n_layer=n_layer, seed=seed, std=std, attn='sparse')
    sparse = sparse.to(device, dtype).train()
    sparse.config.tile = tile
    dense = copy.deepcopy(sparse)
    dense.config.attn = 'dense'
    assert sparse.config.attn == 'sparse' and dense.config.attn == 'dense'
    outs = []
    for net in (sparse, dense):
        logits = net(b['idx'], b['block'], b['role'])
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=dtype, device=device).view_as(logits)).sum().backward()
        outs.append((logits.detach(), {name: p.grad for name, p in net.named_parameters()}))
    return outs


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 10), m=st.integers(2, 30), max_text=st.integers(1, 40),
       mask=st.sampled_from(['isolated', 'window']), pos=st.sampled_from(['alibi', 'learned']),
       n_layer=st.integers(1, 3), tile=st.sampled_from([1, 7, 64]), mode=st.sampled_from(['sw', 'dti']),
       seed=st.integers(0, 2**16))
def test_sparse_equals_dense_outputs_and_gradients_exactly(n, k, m, max_text, mask, pos, n_layer, tile, mode, seed):
    """In float64 the two paths agree to round-off (1e-10): the sparse path computes the same
    function, whatever the layout. Large weights (std 0.5) make any wrong key visible."""
    (sparse, sparse_grads), (dense, dense_grads) = sparse_and_dense_runs(
        n, k, m, max_text, mask, pos, n_layer, tile, mode, seed, torch.float64, std=0.5)
    torch.testing.assert_close(sparse, dense, atol=1e-10, rtol=1e-10)
    for name, grad in dense_grads.items():
        scale = max(1.0, grad.abs().max().item())
        assert (sparse_grads[name] - grad).abs().max().item() <= 1e-10 * scale, name


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('seed', range(8))
def test_sparse_equals_dense_within_1e5_in_fp32(seed, device):
    """The fp32 bar, on fixed layouts (hypothesis above explores them in float64): logits within
    1e-5, each gradient within 1e-5 of its own norm. Weights of std 0.1 keep attention far from
    uniform; float32 round-off through three layers of std-0.5 weights alone can exceed 1e-5."""
    rng = np.random.default_rng(seed)
    layout = dict(n=int(rng.integers(1, 7)), k=int(rng.integers(1, 11)), m=int(rng.integers(2, 31)),
                  max_text=int(rng.integers(1, 41)), mask=['isolated', 'window'][seed % 2],
                  pos=['alibi', 'learned'][seed // 2 % 2], n_layer=3, tile=[1, 7, 64][seed % 3],
                  mode=['sw', 'dti'][seed // 4 % 2], seed=seed)
    (sparse, sparse_grads), (dense, dense_grads) = sparse_and_dense_runs(**layout, dtype=torch.float32, std=0.1,
                                                                         device=device)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    for name, grad in dense_grads.items():
        assert (sparse_grads[name] - grad).norm().item() <= 1e-5 * max(1.0, grad.norm().item()), name


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 8), m=st.integers(2, 25), mask=st.sampled_from(['isolated', 'window']),
       tile=st.sampled_from([3, 16, 64]), seed=st.integers(0, 2**16))
def test_every_tile_range_is_tight_and_covers_its_rows(n, k, m, mask, tile, seed):
    """No computed key range holds a key column that is masked for every row of its tile at
    either end, every allowed key of every row lies inside its tile's range, the tile masks are
    the dense mask's rows, and every real row is computed exactly once. A tile's range [lo, hi)
    is its first key and one past its last real row."""
    rng = np.random.default_rng(seed)
    b = pad(dti_streams(random_history(rng, n + m), n, k) + sw_prompts(random_history(rng, n + 2), n))
    B = len(b['idx'])
    full = model.attention_mask(b['block'], b['role'], n, mask)[:, 0]          # (B, T, T)
    covered = torch.zeros_like(b['role'])
    for g in model.sparse_tiles(b['block'], b['role'], n, mask, 2, tile=tile):
        for t in range(len(g.keys)):
            q_t, ok_t = g.rows[:, t * tile:(t + 1) * tile], g.real[:, t * tile:(t + 1) * tile]   # (B, tile)
            rows = full[torch.arange(B)[:, None], q_t] & ok_t[:, :, None]     # (B, tile, T)
            lo_t, hi_t = int(g.keys[t, 0]), int(q_t[ok_t].max()) + 1
            assert rows[:, :, lo_t].any() and rows[:, :, hi_t - 1].any()      # tight at both ends
            assert not rows[:, :, :lo_t].any() and not rows[:, :, hi_t:].any()  # nothing allowed left out
            K = hi_t - lo_t
            assert torch.equal(g.keys[t, :K], torch.arange(lo_t, hi_t))
            tile_mask = g.mask.view(B, 2, len(g.keys), tile, -1)[:, 0, t]         # (B, tile, K) head 0
            assert torch.equal(tile_mask[:, :, :K] & ok_t[:, :, None], rows[:, :, lo_t:hi_t])
            assert not (tile_mask[:, :, K:] & ok_t[:, :, None]).any()          # padding keys never seen
        covered.index_put_((torch.arange(B)[:, None].expand_as(g.rows)[g.real], g.rows[g.real]), torch.tensor(1),
                           accumulate=True)
    assert torch.equal(covered, (b['role'] != data.PAD).long())  # every real row exactly once, PAD rows never


# -----------------------------------------------------------------------------
# FlexAttention (the CUDA path) and the compiled step


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 10), m=st.integers(2, 30), max_text=st.integers(1, 40),
       mask=st.sampled_from(['isolated', 'window']), pos=st.sampled_from(['alibi', 'learned']),
       n_layer=st.integers(1, 3), mode=st.sampled_from(['sw', 'dti']), seed=st.integers(0, 2**16))
@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
def test_flex_equals_dense_in_eval_within_1e5(n, k, m, max_text, mask, pos, n_layer, mode, seed):
    """--attn flex states the masks as a mask_mod (the same pair_rules) and ALiBi as a score_mod:
    in eval, in fp32, its logits equal the dense reference's within 1e-5 on random layouts
    (FlexAttention has no backward on a CPU in torch 2.13; on CUDA it trains)."""
    rng = np.random.default_rng(seed)
    histories = [random_history(rng, n + m, max_text), random_history(rng, n + max(1, m // 3), max_text)]
    prompts = [p for h in histories for p in (sw_prompts(h, n) if mode == 'sw' else dti_streams(h, n, k))]
    b = pad([prompts[i] for i in rng.permutation(len(prompts))[:6]])
    net = small_model(n=n, mask=mask, pos=pos, n_layer=n_layer, seed=seed, std=0.1)
    logits = {}
    with torch.no_grad():
        for attn in ('dense', 'flex'):
            net.config.attn = attn
            logits[attn] = net(b['idx'], b['block'], b['role'])
    real = b['role'] != data.PAD
    torch.testing.assert_close(logits['flex'][real], logits['dense'][real], atol=1e-5, rtol=1e-5)


def test_flex_block_mask_holds_exactly_the_masks_pairs():
    """The BlockMask's mask_mod, evaluated on every pair, is attention_mask: the same rules."""
    rng = np.random.default_rng(1)
    b = pad(dti_streams(random_history(rng, 30, 9), 3, 5) + sw_prompts(random_history(rng, 6), 3))
    for kind in ('window', 'isolated'):
        net = small_model(n=3, mask=kind, attn='flex')
        bm = net.attention_plan(b['block'], b['role'])
        B, T = b['block'].shape
        q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        dense = torch.stack([bm.mask_mod(torch.tensor(i), torch.tensor(0), q, k) for i in range(B)])  # (B, T, T)
        assert torch.equal(dense, model.attention_mask(b['block'], b['role'], 3, kind)[:, 0])


def test_a_training_step_compiles_whole_with_a_precomputed_plan():
    """With the attention plan built before the step (as the trainer does), forward and loss
    compile as one graph: torch.compile(fullgraph=True) raises at any graph break. The compiled
    step gives the eager loss, and its backward the eager gradients."""
    rng = np.random.default_rng(0)
    b = pad(dti_streams(random_history(rng, 24, 7), 3, 5) + sw_prompts(random_history(rng, 9), 3))
    net = small_model(n=3, std=0.1, attn='sparse').train()
    plan = net.attention_plan(b['block'], b['role'])

    def step(idx, block, role, label, plan):
        return model.ctr_loss(net(idx, block, role, plan), label)
    results = []
    for run in (step, torch.compile(step, fullgraph=True)):
        net.zero_grad()
        loss = run(b['idx'], b['block'], b['role'], b['label'], plan)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in net.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert abs(eager - compiled) < 1e-5
    for a, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)
