"""Tokenizer, block layout, SW prompts vs DTI streams, collation and the synthetic data set."""
import socket

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import roc_auc_score


import data
from conftest import as_lists, dti_streams, from_histories, random_history, sw_prompts
from data import LABEL, PAD, SUM, TEXT


def test_tokenizer_is_gpt2_and_works_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError('network used')
    monkeypatch.setattr(socket, 'socket', no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    data.get_tokenizer.cache_clear()
    enc = data.get_tokenizer()
    assert enc.encode_ordinary('hello world') == [31373, 995]
    assert enc.encode_ordinary('Hello, world!') == [15496, 11, 995, 0]
    assert enc.n_vocab == data.VOCAB_SIZE


def test_special_tokens_round_trip():
    enc = data.get_tokenizer()
    ids = [data.SUM_ID, data.YES_ID, data.NO_ID, data.PAD_ID]
    assert enc.decode(ids) == '[SUM]<|yes|><|no|>[PAD]'
    assert enc.encode('[SUM]<|yes|><|no|>[PAD]', allowed_special='all') == ids
    # in item text they are plain text, never the special ids
    assert not set(data.encode_text('[SUM] <|yes|>')) & set(ids)
    assert enc.decode(data.encode_text('Heat (1995) | Action, Crime')) == 'Heat (1995) | Action, Crime'


def blocks_of(prompt):
    """Split a flat prompt back into its blocks: (text ids, label token, is target, target label)."""
    out = []
    for b in range(prompt['block'].max() + 1):
        at = prompt['block'] == b
        idx, role, label = prompt['idx'][at], prompt['role'][at], prompt['label'][at]
        assert list(role) == [TEXT] * (len(role) - 2) + [SUM, LABEL]
        assert idx[-2] == data.SUM_ID
        assert (label[role != SUM] == -1).all()
        out.append((list(idx[:-2]), int(idx[-1]), int(label[-2])))
    return out


def test_block_layout_and_sw_prompts(rng):
    history = random_history(rng, 9)
    n = 3
    prompts = sw_prompts(history, n)
    assert len(prompts) == len(history) - n
    for i, p in zip(range(n, len(history)), prompts):
        assert np.all(np.diff(p['block']) >= 0)
        got = blocks_of(p)
        assert [(t, lab) for t, lab, _ in got] == [(t, data.YES_ID if y else data.NO_ID) for t, y in history[i - n:i + 1]]
        assert [target for *_, target in got] == [-1] * n + [history[i][1]]  # the target is the last block only


@pytest.mark.parametrize('n,k,m', [(3, 4, 3), (3, 4, 4), (3, 4, 11), (3, 4, 15), (1, 1, 6), (5, 50, 40), (2, 7, 9)])
def test_dti_streams_cover_every_target_once_in_sw_order(n, k, m, rng):
    history = random_history(rng, m)
    streams = dti_streams(history, n, k)
    sw = sw_prompts(history, n)
    assert len(streams) == -(-max(m - n, 0) // k)
    sw_targets = [blocks_of(p)[-1] for p in sw]
    dti_targets = []
    for s in streams:
        blocks = blocks_of(s)
        assert [tgt for *_, tgt in blocks[:n]] == [-1] * n  # n context blocks first
        assert 1 <= len(blocks) - n <= k
        dti_targets += blocks[n:]
    assert dti_targets == sw_targets
    assert sum((p['label'] >= 0).sum() for p in streams) == sum((p['label'] >= 0).sum() for p in sw) == max(m - n, 0)


def test_collate_pads_right(rng):
    """A batch of SW prompts and streams of two users: each row is its prompt's arrays, then FILL."""
    ds = from_histories([random_history(rng, 5), random_history(rng, 12)])
    prompts = np.concatenate([data.sw_prompts(np.array([[0, 5]]), 2), data.dti_streams(np.array([[5, 17]]), 2, 10)])
    b = data.collate(ds, prompts, multiple=8)
    lengths = data.prompt_tokens(ds, prompts)
    assert all(v.shape == (len(prompts), 8 * -(-lengths.max() // 8)) for v in b.values())
    for row, (L, (first, end, _)) in enumerate(zip(lengths, prompts)):
        assert (b['role'][row, :L] != PAD).all() and b['block'][row, L - 1] == end - first - 1
        assert (b['idx'][row, L:] == data.PAD_ID).all() and (b['role'][row, L:] == PAD).all()
        assert (b['label'][row, L:] == -1).all() and (b['block'][row, L:] == -1).all()


def test_segments_give_each_split_its_targets_with_full_windows():
    long = [([i], i % 2) for i in range(10)]                       # user 1: global blocks 3 .. 12
    ds = from_histories([[([99], 1)] * 3, long], [[0, 0, 0], [0] * 6 + [1] * 2 + [2] * 2],
                             [np.full(3, np.nan), np.arange(10) / 10])  # user 0 (3 blocks) comes first
    n = 4
    runs, prob = data.segments(ds, 0, n)  # user 0 has no train target with 4 predecessors
    assert runs.tolist() == [[3, 9]] and prob.tolist() == [0.4, 0.5]
    runs, prob = data.segments(ds, 1, n)  # context comes from the train split: history is history
    assert runs.tolist() == [[5, 11]] and prob.tolist() == [0.6, 0.7]
    runs, prob = data.segments(ds, 2, 9)  # only interaction 9 has 9 predecessors
    assert runs.tolist() == [[3, 13]] and prob.tolist() == [0.9]


@pytest.fixture(scope='module')
def small_synthetic():
    return {c: data.synthetic(n_users=80, n=5, canary=c, seed=3) for c in (None, 'future', 'far')}


def decode(ids):
    return data.get_tokenizer().decode(ids)


def test_synthetic_click_probability_depends_only_on_the_window(small_synthetic):
    """logit(prob) - mood_weight * (2 * mean label of the window - 1) must be one number per item
    text: the item's own appeal. Anything hidden (the drifting taste, the user) would break that."""
    (users, _, probs, _), n = as_lists(small_synthetic[None]), 5
    appeal = {}
    for blocks, prob in zip(users, probs):
        for t, (text_ids, _) in enumerate(blocks):
            window = [y for _, y in blocks[max(0, t - n):t]]
            z = np.log(prob[t] / (1 - prob[t])) - 2.0 * (2 * np.mean(window) - 1 if window else 0.0)
            appeal.setdefault(decode(text_ids), []).append(z)
    assert len(appeal) > 50
    assert max(np.ptp(v) for v in appeal.values()) < 1e-6
    assert np.std([v[0] for v in appeal.values()]) > 0.5  # and items really differ


def test_synthetic_is_learnable_split_by_time_and_canaries_plant_what_they_say(small_synthetic):
    users, splits, probs, _ = as_lists(small_synthetic[None])
    assert all(np.all(np.diff(s) >= 0) for s in splits)
    counts = np.bincount(np.concatenate(splits), minlength=3) / sum(len(s) for s in splits)
    assert abs(counts[0] - 0.8) < 0.03 and abs(counts[1] - 0.1) < 0.03 and abs(counts[2] - 0.1) < 0.03
    y = np.concatenate([[lab for _, lab in u] for u in users])
    assert 0.3 < y.mean() < 0.85
    assert roc_auc_score(y, np.concatenate(probs)) > 0.75

    fut = as_lists(small_synthetic['future'])[0]  # same seed: same items and labels, markers added
    for u, v in zip(users, fut):
        assert [lab for _, lab in u] == [lab for _, lab in v]
        for t in range(1, len(v)):
            assert decode(v[t][0]) == decode(u[t][0]) + data.MARKS[u[t - 1][1]]

    (far, _, far_prob, _), n = as_lists(small_synthetic['far']), 5
    agree, total = 0, 0
    for blocks, prob in zip(far, far_prob):
        marks = [data.MARKS.index(' | ' + decode(t).rsplit(' | ', 1)[1]) for t, _ in blocks]
        for t in range(n + 1, len(blocks)):
            agree += marks[t - n - 1] == blocks[t][1]
            total += 1
    # the marker n+1 back predicts the label far above chance, yet prob (what the window shows)
    # cannot use it: its AUC stays much lower than a model that reads the marker
    assert agree / total > 0.75
    yf = np.concatenate([[lab for _, lab in u] for u in far])
    assert roc_auc_score(yf, np.concatenate(far_prob)) < 0.7


# -----------------------------------------------------------------------------
# prompts from the columns: references into the flat arrays give the block layout, token for token


def expected_prompt(blocks, first_target):
    """The block layout in words: each block its text ids, [SUM], then its label token; the [SUM] of
    a block from first_target on carries its label, every other token -1."""
    out = dict(idx=[], block=[], role=[], label=[])
    for b, (text, y) in enumerate(blocks):
        out['idx'] += list(text) + [data.SUM_ID, data.YES_ID if y else data.NO_ID]
        out['block'] += [b] * (len(text) + 2)
        out['role'] += [TEXT] * len(text) + [SUM, LABEL]
        out['label'] += [-1] * len(text) + [y if b >= first_target else -1, -1]
    return out


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries(dict(
    lengths=st.lists(st.integers(1, 14), min_size=1, max_size=5), n=st.integers(1, 4), k=st.integers(1, 6),
    max_text=st.integers(0, 5), split=st.integers(0, 2), seed=st.integers(0, 2**16))))
def test_prompts_from_columns_are_the_block_layout_token_for_token(layout):
    """Users of random lengths and text lengths (empty texts too), random splits: for every
    split, SW and DTI, data.collate of the prompts gives exactly the block layout of the blocks
    each prompt names, padding after; the SW prompts are one per target, the streams k targets
    each, both with n blocks of context; prompt_tokens and target_labels agree."""
    rng = np.random.default_rng(layout['seed'])
    n, k = layout['n'], layout['k']
    users = [[(rng.integers(0, 1000, rng.integers(0, layout['max_text'] + 1)).tolist(), int(rng.integers(0, 2)))
              for _ in range(m)] for m in layout['lengths']]
    ds = from_histories(users, [np.sort(rng.integers(0, 3, len(u))) for u in users])
    flat = [block for u in users for block in u]
    runs, _ = data.segments(ds, layout['split'], n)
    for prompts, per_prompt in ((data.sw_prompts(runs, n), 1), (data.dti_streams(runs, n, k), k)):
        if not len(prompts):
            continue
        b = data.collate(ds, prompts)
        for row, (first, end, first_target) in enumerate(prompts):
            assert first_target - first == n and 1 <= end - first_target <= per_prompt
            want = expected_prompt(flat[first:end], first_target - first)
            L = len(want['idx'])
            for key in want:
                assert b[key][row, :L].tolist() == want[key], key
                assert (b[key][row, L:] == data.FILL[key]).all(), key
        assert data.prompt_tokens(ds, prompts).tolist() == (b['role'] != PAD).sum(1).tolist()
        assert data.target_labels(ds, prompts).tolist() == b['label'][b['label'] >= 0].tolist()
    targets = data.target_blocks(data.sw_prompts(runs, n))
    assert targets.tolist() == data.target_blocks(data.dti_streams(runs, n, k)).tolist()  # same targets, same order
    assert set(targets.tolist()) == {t for a, b in runs for t in range(a + n, b)}


def test_a_generated_data_set_is_its_own_histories():
    """synthetic() builds its columns in one go; from_histories of its per-user lists gives them back."""
    ds = data.synthetic(n_users=30, n=5, canary='far')
    users, splits, probs, items = as_lists(ds)
    again = from_histories(users, splits, probs, items, ds['name'])
    for key in ('tokens', 'token_start', 'label', 'item', 'split', 'prob', 'user_start'):
        assert np.array_equal(ds[key], again[key], equal_nan=key == 'prob'), key
    assert ds['tokens'].dtype == np.int32 and ds['label'].dtype == np.int8 and data.fingerprint(ds) == data.fingerprint(again)


def test_preparing_sw_prompts_takes_memory_that_does_not_grow_with_n():
    """SW prompts are references, not token arrays: at n=40 a target's prompt is 41 blocks, yet
    preparing all of them takes no more memory than at n=5 (per target: three integers)."""
    import dti_minimal
    ds = data.synthetic(n_users=200, n=40, min_len=100, max_len=120)

    def peak(n):
        tracemalloc.start()
        refs = dti_minimal.split_prompts(ds, 0, 'sw', n, 50)[0]
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, len(refs)
    (small, targets_small), (large, targets_large) = peak(5), peak(40)
    assert targets_large > 0.5 * targets_small
    assert large < 1.5 * small and large < 200 * targets_small  # bytes; a token array per prompt would be ~8x


def test_the_fingerprint_tells_data_sets_apart():
    a = data.synthetic(n_users=30, n=5)
    assert data.fingerprint(a) == data.fingerprint(data.synthetic(n_users=30, n=5))
    assert data.fingerprint(a) != data.fingerprint(data.synthetic(n_users=30, n=5, seed=1))
    b = dict(a, label=a['label'].copy())
    b['label'][17] ^= 1
    assert data.fingerprint(a) != data.fingerprint(b)


def test_item_texts_are_cut_to_a_bound_and_counted():
    long = 'Very ' * 5000 + '| Drama'
    ds = data.build_dataset('t', ['Short | Drama', long], np.array([0, 1, 1]), [1, 0, 1], [1, 2, 2], [0, 0, 0],
                            [np.nan] * 3, [3])
    assert np.diff(ds['token_start']).tolist() == [len(data.encode_text('Short | Drama')), 64, 64]
    assert ds['cut'] == 1 and '(1 item texts cut to 64 tokens)' in data.describe(ds, 1)
