import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
import data  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# a tiny synthetic run of the CLI: seconds, not minutes. At the default --lr (3e-3) steps of 64
# targets hit a loss spike whose recovery depends on float round-off, so the outcome differed
# between CPUs; at 1e-3 training is stable and every seed lands in the same place.
TINY = ['--users', '40', '--n', '5', '--k', '10', '--n-layer', '2', '--n-embd', '32', '--epochs', '1',
        '--batch-size', '64', '--lr', '1e-3']
# the devices a test of the model runs on: the CPU everywhere, CUDA where there is one (not in CI)
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason='needs a CUDA device'))]


def random_history(rng, m, max_text=6):
    """m blocks of 1..max_text random text ids (plain GPT-2 ids) with random labels."""
    return [(rng.integers(0, 1000, rng.integers(1, max_text + 1)).tolist(), int(rng.integers(0, 2)))
            for _ in range(m)]


def as_lists(ds):
    """A columnar data set as per-user lists: (histories as lists of blocks, splits, probs, items)."""
    cut = lambda a: np.split(a, ds['user_start'][1:-1])
    return [data.user_blocks(ds, u) for u in range(len(ds['user_start']) - 1)], cut(ds['split']), cut(ds['prob']), \
        cut(ds['item'])


def from_histories(histories, splits=None, probs=None, items=None, name='histories'):
    """A columnar data set (the layout of data.py) from per-user lists of blocks (text ids, label),
    with each block's split (and true probability, item id); by default all train."""
    lengths = [len(h) for h in histories]
    L = np.array([len(ids) for h in histories for ids, _ in h], dtype=np.int64)
    cat = lambda xs, fill, dtype: np.concatenate([np.asarray(x, dtype) for x in xs]) if xs is not None else \
        np.full(len(L), fill, dtype)
    return dict(tokens=np.array([t for h in histories for ids, _ in h for t in ids], dtype=np.int32),
                token_start=np.r_[0, np.cumsum(L)], label=np.array([y for h in histories for _, y in h], np.int8),
                item=cat(items, -1, np.int64), split=cat(splits, 0, np.int8), prob=cat(probs, np.nan, np.float64),
                user_start=np.r_[0, np.cumsum(lengths)].astype(np.int64), name=name, cut=0)


def prompt_arrays(ds, prompts):
    """Each prompt as a dict of its four arrays, unpadded (data.collate, its padding cut off)."""
    if not len(prompts):
        return []
    b = data.collate(ds, prompts)
    real = b['role'] != data.PAD
    return [{key: v[i][real[i]].numpy() for key, v in b.items()} for i in range(len(prompts))]


def sw_prompts(blocks, n):
    """The SW prompts of one user's blocks (text ids, label), each as its four arrays."""
    return prompt_arrays(from_histories([blocks]), data.sw_prompts(np.array([[0, len(blocks)]]), n))


def dti_streams(blocks, n, k):
    """The DTI streams of one user's blocks (text ids, label), each as its four arrays."""
    return prompt_arrays(from_histories([blocks]), data.dti_streams(np.array([[0, len(blocks)]]), n, k))


def pad(prompts):
    """Prompts (dicts of four arrays) -> one batch of (B, T) long tensors, right-padded with data.FILL."""
    T = max(len(p['idx']) for p in prompts)
    out = {key: np.full((len(prompts), T), v, dtype=np.int64) for key, v in data.FILL.items()}
    for b, p in enumerate(prompts):
        for key in data.FILL:
            out[key][b, :len(p[key])] = p[key]
    return {key: torch.from_numpy(v) for key, v in out.items()}


def small_model(n, mask='isolated', pos='alibi', n_layer=2, seed=0, std=0.5, attn='dense'):
    """A tiny GPT whose weights are large enough that attention is far from uniform, so that a
    token that is visible moves the logit clearly while an invisible one cannot move it at all."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=data.VOCAB_SIZE, yes_id=data.YES_ID, no_id=data.NO_ID,
                          n_layer=n_layer, n_head=2, n_embd=16, n=n, mask=mask, pos=pos, attn=attn))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # matrices and embeddings; layer norms and biases keep their init
                p.normal_(0.0, std)
    return model.eval()


def target_logits(model, prompts):
    """Logits of all targets of `prompts`, in order, from one padded batch on the model's device."""
    device = next(model.parameters()).device
    b = {key: v.to(device) for key, v in pad(prompts).items()}
    with torch.no_grad():
        logits = model(b['idx'], b['block'], b['role'])
    return logits[b['label'] >= 0]


def one_line_error(capsys, argv):
    """Run the CLI in-process on argv, which must fail on bad input: exit code 2, one line on
    stderr, no traceback. Returns that line."""
    import dti_minimal
    with pytest.raises(SystemExit) as e:
        dti_minimal.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    return err


@pytest.fixture
def rng():
    return np.random.default_rng(0)
