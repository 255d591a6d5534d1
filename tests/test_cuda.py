"""The CUDA path, where a GPU is present (skipped elsewhere, CI included): the sparse path against
the dense reference in fp32 (outputs and gradients) and under bf16 autocast, and DTI == SW."""
import copy

import numpy as np
import pytest
import torch

import data
from conftest import random_history, small_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def to_cuda(prompts):
    return {key: v.cuda() for key, v in data.collate(prompts).items()}


@pytest.mark.parametrize('seed', range(12))
def test_sparse_equals_dense_on_cuda_fp32_and_bf16(seed):
    rng = np.random.default_rng(seed)
    n, k, m, max_text = (int(rng.integers(1, 7)), int(rng.integers(1, 11)), int(rng.integers(2, 31)),
                         int(rng.integers(1, 41)))
    mask, pos, mode = ['isolated', 'window'][seed % 2], ['alibi', 'learned'][seed // 2 % 2], ['sw', 'dti'][seed // 4 % 2]
    histories = [random_history(rng, n + m, max_text), random_history(rng, n + max(1, m // 3), max_text)]
    b = to_cuda([p for h in histories for p in (data.sw_prompts(h, n) if mode == 'sw' else data.dti_streams(h, n, k))][:6])
    sparse = small_model(n=n, mask=mask, pos=pos, n_layer=3, seed=seed, std=0.1).cuda().train()
    sparse.config.tile = [1, 7, 64][seed % 3]
    dense = copy.deepcopy(sparse)
    dense.config.attn = 'dense'
    outs = []
    for net in (sparse, dense):
        logits = net(b['idx'], b['item'], b['role'])                           # (B, T)
        (logits * torch.linspace(-1, 1, logits.numel(), device='cuda').view_as(logits)).sum().backward()
        outs.append((logits.detach(), {name: p.grad for name, p in net.named_parameters()}))
    (sparse_logits, sparse_grads), (dense_logits, dense_grads) = outs
    torch.testing.assert_close(sparse_logits, dense_logits, atol=1e-5, rtol=0)
    for name, grad in dense_grads.items():
        assert (sparse_grads[name] - grad).norm().item() <= 1e-5 * max(1.0, grad.norm().item()), name
    with torch.autocast('cuda', dtype=torch.bfloat16), torch.no_grad():
        bf16 = sparse(b['idx'], b['item'], b['role']).float()                  # (B, T)
    at_sum = b['role'] == data.SUM
    assert (bf16 - dense_logits)[at_sum].abs().max() <= 5e-2 * max(1.0, dense_logits[at_sum].abs().max().item())


def test_dti_equals_sw_on_cuda():
    h = random_history(np.random.default_rng(0), 20 + 60, 12)
    net = small_model(n=20, n_layer=3, std=0.1).cuda()
    with torch.no_grad():
        sw, dti = (net(b['idx'], b['item'], b['role'])[b['label'] >= 0]
                   for b in (to_cuda(data.sw_prompts(h, 20)), to_cuda(data.dti_streams(h, 20, 25))))
    assert len(sw) == len(dti) == 60
    torch.testing.assert_close(dti, sw, atol=1e-5, rtol=0)
