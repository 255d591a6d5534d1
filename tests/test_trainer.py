"""The trainer end to end on tiny synthetic data: it learns, writes results.json, compare.json and
ablation.json, and two runs of one command train alike."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import data
import dti_minimal
from conftest import TINY, from_histories
from model import GPT, GPTConfig, ctr_loss

KEYS = ['mode', 'dataset', 'n', 'k', 'mask', 'pos', 'n_layer', 'n_head', 'n_embd', 'seed', 'targets_trained',
        'train_seconds', 'time_per_target_ms', 'valid_auc', 'test_auc', 'test_logloss', 'test_f1', 'test_acc',
        'bayes_auc', 'args']


@pytest.mark.parametrize('mode', ['sw', 'dti'])
def test_end_to_end_run_writes_results(mode, tmp_path):
    res = dti_minimal.main(TINY + ['--mode', mode, '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert set(KEYS) <= set(saved) and saved == json.loads(json.dumps(res))
    assert saved['mode'] == mode and saved['args']['ks'] == [saved['k']] == [10] and saved['n'] == 5
    assert saved['targets_trained'] > 500 and saved['time_per_target_ms'] > 0
    assert 0.5 < saved['bayes_auc'] < 1 and 0 <= saved['test_auc'] <= 1
    assert not list(tmp_path.glob('*.tmp'))


def test_training_reduces_the_loss():
    """Three epochs take the loss of the train targets from ln 2 (0.69) to 0.47-0.50 (measured for
    seeds 0-5 on both attention paths; this test runs seed 0 on the sparse one): the bar, a drop of
    0.1, is half of that."""
    args = dti_minimal.parse_args(TINY + ['--epochs', '3'])
    ds = dti_minimal.load_dataset(args)
    units = dti_minimal.split_prompts(ds, 0, 'dti', args.n, 10)[0]
    model = dti_minimal.build_model(args, 'dti', 0)
    b = data.collate(ds, units)

    def loss():
        with torch.no_grad():
            return ctr_loss(model(b['idx'], b['block'], b['role']), b['label']).item()
    before = loss()
    records = dti_minimal.train(model, ds, units, 'dti', args, seed=0)
    assert sum(r.targets for r in records) == 3 * int((b['label'] >= 0).sum())
    assert all(r.seconds > 0 for r in records) and len(records) > 10
    assert loss() < before - 0.1, (before, loss())


def test_sw_and_dti_evaluation_agree_under_isolated_alibi():
    """--eval-mode dti scores the same targets with the same logits as the default SW evaluation."""
    args = dti_minimal.parse_args(TINY)
    ds = dti_minimal.load_dataset(args)
    model = dti_minimal.build_model(args, 'dti', 0)
    sw, p_sw = dti_minimal.split_prompts(ds, 2, 'sw', args.n, 10)
    dti, p_dti = dti_minimal.split_prompts(ds, 2, 'dti', args.n, 10)
    assert np.array_equal(p_sw, p_dti)
    assert np.array_equal(data.target_labels(ds, sw), data.target_labels(ds, dti))
    np.testing.assert_allclose(dti_minimal.predict(model, ds, dti, 'cpu'), dti_minimal.predict(model, ds, sw, 'cpu'), atol=1e-5)


def test_flops_per_target_matches_a_hand_count():
    """One SW prompt of two blocks [t S L][t S L], n=1, C=4, one layer. Allowed pairs:
    isolated t0:1 S0:2 L0:2 t1:1 S1:4 L1:2 = 12; window t0:1 S0:2 L0:2 t1:3 S1:4 L1:4 = 16.
    Forward = 24*T*C^2 + 4*pairs*C + 2*T*C with T=6; training = 3 x forward."""
    ds = from_histories([[([11], 1), ([12], 0)]])
    prompt = data.sw_prompts(np.array([[0, 2]]), 1)
    for mask, pairs in (('isolated', 12), ('window', 16)):
        config = GPTConfig(n=1, n_embd=4, n_head=1, n_layer=1, mask=mask)
        assert dti_minimal.flops_per_target(ds, prompt, config) == 3 * (24 * 6 * 16 + 4 * pairs * 4 + 2 * 6 * 4)


def test_max_train_targets_gives_both_modes_the_same_first_targets():
    args = dti_minimal.parse_args(TINY)
    ds = dti_minimal.load_dataset(args)
    sw, p_sw = dti_minimal.split_prompts(ds, 0, 'sw', 5, 10, max_targets=333)
    dti, p_dti = dti_minimal.split_prompts(ds, 0, 'dti', 5, 10, max_targets=333)
    targets = lambda prompts: int(data.prompt_targets(prompts).sum())
    assert targets(sw) == targets(dti) == len(p_sw) == len(data.target_labels(ds, sw)) == 333
    assert np.array_equal(data.target_labels(ds, sw), data.target_labels(ds, dti))
    full, p_full = dti_minimal.split_prompts(ds, 0, 'sw', 5, 10)
    assert np.array_equal(data.target_labels(ds, full)[:333], data.target_labels(ds, sw))
    assert np.array_equal(p_full[:333], p_sw)


def test_history_sets_user_lengths_and_full_streams_raise_the_analytic_speedup():
    def analytic(history):
        args = dti_minimal.parse_args(TINY + ['--history', history])
        ds = dti_minimal.load_dataset(args)
        sw, dti = (dti_minimal.split_prompts(ds, 0, mode, 5, 10)[0] for mode in ('sw', 'dti'))
        config = dti_minimal.build_model(args, 'dti', 0).config
        return ds, dti_minimal.flops_per_target(ds, sw, config) / dti_minimal.flops_per_target(ds, dti, config)
    short, ratio_short = analytic('18,18')  # ~9 train targets a user: one stream, partly empty
    long, ratio_long = analytic('150,150')  # ~115: mostly full streams of k=10
    assert set(np.diff(short['user_start'])) == {18} and set(np.diff(long['user_start'])) == {150}
    assert 1 < ratio_short < ratio_long


def test_compare_mode_writes_compare_json_with_a_k_sweep(tmp_path):
    res = dti_minimal.main(TINY + ['--mode', 'compare', '--k', '2,20', '--max-train-targets', '600',
                                   '--eval-mode', 'dti', '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'compare.json').read_text())
    for key in ('sw_time_per_target_ms', 'dti_time_per_target_ms', 'speedup', 'analytic_speedup',
                'sw_test_auc', 'dti_test_auc', 'n', 'k', 'mask'):
        assert key in saved, key
    assert saved['k'] == 2 and [r['k'] for r in saved['sweep']] == [2, 20]
    assert saved['targets_trained'] == 600
    # more targets per stream share the context better: the analytic speed-up grows with k
    assert 1 < saved['sweep'][0]['analytic_speedup'] < saved['sweep'][1]['analytic_speedup']
    assert res['speedup'] == saved['speedup'] > 0


def test_bench_mode_times_both_attention_paths(tmp_path):
    res = dti_minimal.main(['--mode', 'bench', '--n', '5', '--n-layer', '1', '--n-embd', '16', '--n-head', '2',
                            '--mask', 'window', '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'bench.json').read_text())
    assert saved == json.loads(json.dumps(res)) and saved['tokens'] > 2000
    assert saved['sparse_ms'] > 0 and saved['dense_ms'] > 0 and saved['speedup'] > 0


def test_configure_optimizers_decays_matrices_and_embeddings_only():
    model = GPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, pos='learned'))
    decay, no_decay = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3).param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert {id(p) for p in decay['params']} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in no_decay['params']} == {id(p) for p in model.parameters() if p.dim() < 2}
    assert id(model.transformer.wte.weight) in map(id, decay['params'])
    assert id(model.transformer.ln_f.bias) in map(id, no_decay['params'])



def target_blocks(b):
    """Every target of a collated batch as (its block's token ids, its label), in order."""
    out = []
    for idx, block, label in zip(b['idx'], b['block'], b['label']):
        for q in np.flatnonzero(label >= 0):
            out.append((tuple(idx[block == block[q]].tolist()), int(label[q])))
    return out


def test_sw_step_j_trains_on_exactly_the_targets_of_dti_step_j():
    args = dti_minimal.parse_args(TINY)
    ds = dti_minimal.load_dataset(args)
    units = dti_minimal.split_prompts(ds, 0, 'dti', 5, 10)[0]
    schedule = dti_minimal.batches(units, 64, np.random.default_rng(0))
    assert len(schedule) > 10 and sorted(len(b) for b in schedule) != [1] * len(schedule)  # batches of several streams
    for batch in schedule:
        sw = data.collate(ds, dti_minimal.unit_prompts(units[batch], 'sw', 5))
        dti = data.collate(ds, dti_minimal.unit_prompts(units[batch], 'dti', 5))
        assert (sw['block'].max(1).values == 5).all() and ((sw['label'] >= 0).sum(1) == 1).all()  # SW prompts
        assert target_blocks(sw) == target_blocks(dti)


def test_compare_is_one_run_computed_two_ways_under_isolated_alibi_only(tmp_path):
    """Paired steps: under isolated + ALiBi (no dropout) every step's loss is the same function of
    the same weights in both paradigms, so the runs agree to round-off at every step; under
    window with two layers the DTI steps see past the window, and the runs part."""
    flags = TINY + ['--mode', 'compare', '--max-train-targets', '600', '--epochs', '4', '--eval-mode', 'dti']
    iso = dti_minimal.main(flags + ['--out', str(tmp_path / 'isolated')])
    saved = json.loads((tmp_path / 'isolated' / 'compare.json').read_text())
    assert len(saved['sw_step_loss']) == len(saved['dti_step_loss']) == saved['sw_steps'] == saved['dti_steps'] > 10
    assert saved['sweep'][0]['dti_step_loss'] == saved['dti_step_loss']
    assert iso['max_step_loss_diff'] < 1e-4
    assert max(abs(a - b) for a, b in zip(iso['sw_step_loss'], iso['dti_step_loss'])) == iso['max_step_loss_diff']
    window = dti_minimal.main(flags + ['--mask', 'window', '--out', str(tmp_path / 'window')])
    assert window['max_step_loss_diff'] > 1e-3


def test_the_path_follows_the_paradigm_not_the_clock(tmp_path):
    """With no --attn a run trains on a path stated in one line (dense for SW, sparse for DTI), so
    two runs of the same command give the same step losses bit for bit."""
    a, b = (dti_minimal.main(TINY + ['--out', str(tmp_path / name)]) for name in 'ab')
    assert a['attn'] == 'sparse' and a['step_loss'] == b['step_loss'] and a['test_auc'] == b['test_auc']
    assert dti_minimal.main(TINY + ['--mode', 'sw', '--max-train-targets', '200', '--out', str(tmp_path / 'c')])['attn'] == 'dense'


def test_ablation_writes_every_row_and_pairs_sw_isolated_with_dti_both(tmp_path):
    res = dti_minimal.main(TINY + ['--mode', 'ablation', '--k', '2,10', '--max-train-targets', '300', '--seeds', '2',
                                   '--eval-mode', 'dti', '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'ablation.json').read_text())
    assert saved == json.loads(json.dumps(res)) and 0.5 < saved['bayes_auc'] < 1
    assert saved['seeds'] == 2 and saved['reference'] == 'SW, standard'
    rows = saved['rows']
    assert [(r['name'], r['k']) for r in rows] == [
        ('SW, standard', None), ('SW, isolated', None), ('DTI, naive', 2), ('DTI, naive', 10),
        ('DTI, ALiBi only', 2), ('DTI, ALiBi only', 10), ('DTI, isolation only', 2), ('DTI, isolation only', 10),
        ('DTI, both', 2), ('DTI, both', 10)]
    for r in rows:
        for key in ('mode', 'mask', 'pos', 'test_auc_sw', 'test_logloss_sw', 'test_auc_stream',
                    'test_logloss_stream', 'valid_auc_sw', 'valid_auc_stream', 'train_seconds',
                    'median_time_per_target_ms', 'speedup', 'attn'):
            assert key in r, (r['name'], key)
        for way in ('sw', 'stream'):
            seeds = r[f'test_auc_{way}_seeds']
            assert len(seeds) == 2 and r[f'test_auc_{way}_mean'] == r[f'test_auc_{way}'] == pytest.approx(np.mean(seeds))
            assert r[f'test_auc_{way}_std'] == pytest.approx(np.std(seeds)) and len(r[f'test_auc_{way}_diff_ci']) == 2
        assert r['targets_trained'] == rows[0]['targets_trained']
    assert rows[0]['test_auc_sw_diff_ci'] == rows[0]['test_auc_stream_diff_ci'] == [0.0, 0.0]  # itself
    assert rows[0]['mask'] == 'window' and rows[0]['speedup'] == 1.0
    assert [r['pos'] for r in rows[2:]] == ['learned'] * 2 + ['alibi'] * 2 + ['learned'] * 2 + ['alibi'] * 2
    isolated, both = rows[1], rows[-1]
    # 'DTI, both' at the largest k is 'SW, isolated' computed another way: same steps, same scores
    assert saved['max_step_loss_diff'] < 1e-4
    assert abs(both['test_auc_sw'] - isolated['test_auc_sw']) < 1e-4
    # and isolated + ALiBi models score a target the same on its SW prompt as in a stream
    for r in (isolated, both, rows[-2]):
        assert abs(r['test_auc_sw'] - r['test_auc_stream']) < 1e-5
        assert abs(r['test_logloss_sw'] - r['test_logloss_stream']) < 1e-5


def test_compare_with_seeds_gives_an_interval_that_holds_zero_for_one_run_computed_two_ways(tmp_path):
    res = dti_minimal.main(TINY + ['--mode', 'compare', '--max-train-targets', '600', '--seeds', '2',
                                   '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'compare.json').read_text())
    assert len(saved['sw_test_auc_seeds']) == len(saved['dti_test_auc_seeds']) == 2
    assert saved['sw_test_auc_seeds'][0] != saved['sw_test_auc_seeds'][1]  # the seed moves weights and batches
    lo, hi = saved['test_auc_diff_ci']
    assert lo <= 0 <= hi and hi - lo < 1e-3, (lo, hi)
    assert res['sweep'][0]['test_auc_diff_ci'] == saved['test_auc_diff_ci']


def test_weighted_auc_is_roc_auc_under_unit_and_integer_weights(rng):
    scores = np.round(rng.normal(size=300), 1)  # many ties
    labels = (rng.random(300) < 0.4).astype(np.int64)
    assert dti_minimal.weighted_auc(scores, labels, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(labels, scores))
    w = rng.integers(0, 3, 300)  # a weight of 2 is the target twice
    again = np.repeat(np.arange(300), w)
    assert dti_minimal.weighted_auc(scores, labels, w[None].astype(float))[0] == pytest.approx(
        roc_auc_score(labels[again], scores[again]))


def test_the_bootstrap_draws_users_not_targets(rng):
    """The same targets, scores and labels as 300 users of one target each, and as one user who
    holds them all: drawing users, the one-user data set is drawn whole every time, so its interval
    is the observed difference itself (width 0), while single targets give a real spread. A model
    against itself is exactly [0, 0]; a model far better everywhere excludes 0."""
    labels = (rng.random(300) < 0.5).astype(np.int64)
    a, b = labels + rng.normal(0, 2.0, 300), labels + rng.normal(0, 1.0, 300)
    blocks, blocks_of = np.arange(300), [([1], int(y)) for y in labels]
    singles, one_user = from_histories([[blk] for blk in blocks_of]), from_histories([blocks_of])
    lo, hi = dti_minimal.paired_ci(singles, blocks, b, a)
    assert 0 < lo < hi  # b is better, and the targets' draws spread the difference
    observed = roc_auc_score(labels, b) - roc_auc_score(labels, a)
    assert dti_minimal.paired_ci(one_user, blocks, b, a) == pytest.approx([observed, observed], abs=1e-12)
    assert dti_minimal.paired_ci(one_user, blocks, a, a) == dti_minimal.paired_ci(singles, blocks, a, a) == [0.0, 0.0]


def test_max_eval_targets_scores_the_first_targets_of_valid_and_test(tmp_path):
    res = dti_minimal.main(TINY + ['--max-eval-targets', '57', '--eval-mode', 'dti', '--out', str(tmp_path)])
    assert res['valid_targets'] == res['test_targets'] == 57
    args = dti_minimal.parse_args(TINY)
    ds = dti_minimal.load_dataset(args)
    full = dti_minimal.split_prompts(ds, 2, 'sw', args.n, 10)[0]
    first = dti_minimal.split_prompts(ds, 2, 'dti', args.n, 10, max_targets=57)[0]
    assert np.array_equal(data.target_labels(ds, first), data.target_labels(ds, full)[:57])
