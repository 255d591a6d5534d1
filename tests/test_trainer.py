"""The trainer end to end on tiny synthetic data: it learns, writes results.json, rejects bad input."""
import json

import numpy as np
import pytest
import torch

import data
import dti_minimal
from conftest import TINY
from model import GPT, GPTConfig, ctr_loss

KEYS = ['mode', 'dataset', 'n', 'k', 'mask', 'pos', 'n_layer', 'n_head', 'n_embd', 'seed', 'targets_trained',
        'train_seconds', 'time_per_target_ms', 'valid_auc', 'test_auc', 'test_logloss', 'test_f1', 'test_acc',
        'bayes_auc', 'args']


@pytest.mark.parametrize('mode', ['sw', 'dti'])
def test_end_to_end_run_writes_results(mode, tmp_path):
    res = dti_minimal.main(TINY + ['--mode', mode, '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert set(KEYS) <= set(saved) and saved == json.loads(json.dumps(res))
    assert saved['mode'] == mode and saved['args']['k'] == saved['k'] == 10 and saved['n'] == 5
    assert saved['targets_trained'] > 500 and saved['time_per_target_ms'] > 0
    assert 0.5 < saved['bayes_auc'] < 1 and 0 <= saved['test_auc'] <= 1
    assert not list(tmp_path.glob('*.tmp'))


def test_training_reduces_the_loss():
    args = dti_minimal.parse_args(TINY + ['--epochs', '3', '--lr', '3e-3'])
    ds = dti_minimal.load_dataset(args)
    prompts, _ = dti_minimal.make_prompts(ds, 0, 'dti', args.n, args.k)
    torch.manual_seed(0)
    model = dti_minimal.build_model(args)
    b = data.collate(prompts)

    def loss():
        with torch.no_grad():
            return ctr_loss(model(b['idx'], b['block'], b['role']), b['label']).item()
    before = loss()
    trained, seconds, records = dti_minimal.train(model, prompts, args)
    assert trained == 3 * data.targets_of(prompts) == sum(r.targets for r in records)
    assert seconds > 0 and len(records) > 10
    assert loss() < before - 0.05, (before, loss())


def test_sw_and_dti_evaluation_agree_under_isolated_alibi():
    """--eval-mode dti scores the same targets with the same logits as the default SW evaluation."""
    args = dti_minimal.parse_args(TINY)
    ds = dti_minimal.load_dataset(args)
    model = dti_minimal.build_model(args)
    sw, p_sw = dti_minimal.make_prompts(ds, 2, 'sw', args.n, args.k)
    dti, p_dti = dti_minimal.make_prompts(ds, 2, 'dti', args.n, args.k)
    assert np.array_equal(p_sw, p_dti)
    assert np.array_equal(dti_minimal.target_labels(sw), dti_minimal.target_labels(dti))
    np.testing.assert_allclose(dti_minimal.predict(model, dti), dti_minimal.predict(model, sw), atol=1e-5)


def test_flops_per_target_matches_a_hand_count():
    """One SW prompt of two blocks [t S L][t S L], n=1, C=4, one layer. Allowed pairs:
    isolated t0:1 S0:2 L0:2 t1:1 S1:4 L1:2 = 12; window t0:1 S0:2 L0:2 t1:3 S1:4 L1:4 = 16.
    Forward = 24*T*C^2 + 4*pairs*C + 2*T*C with T=6; training = 3 x forward."""
    prompt = data.sw_prompts([([11], 1), ([12], 0)], 1)
    for mask, pairs in (('isolated', 12), ('window', 16)):
        config = GPTConfig(n=1, n_embd=4, n_head=1, n_layer=1, mask=mask)
        assert dti_minimal.flops_per_target(prompt, config) == 3 * (24 * 6 * 16 + 4 * pairs * 4 + 2 * 6 * 4)


def test_max_train_targets_gives_both_modes_the_same_first_targets():
    args = dti_minimal.parse_args(TINY)
    ds = dti_minimal.load_dataset(args)
    sw, p_sw = dti_minimal.make_prompts(ds, 0, 'sw', 5, 10, max_targets=333)
    dti, p_dti = dti_minimal.make_prompts(ds, 0, 'dti', 5, 10, max_targets=333)
    assert data.targets_of(sw) == data.targets_of(dti) == len(p_sw) == 333
    assert np.array_equal(dti_minimal.target_labels(sw), dti_minimal.target_labels(dti))
    full, p_full = dti_minimal.make_prompts(ds, 0, 'sw', 5, 10)
    assert np.array_equal(dti_minimal.target_labels(full)[:333], dti_minimal.target_labels(sw))
    assert np.array_equal(p_full[:333], p_sw)


def test_history_sets_user_lengths_and_full_streams_raise_the_analytic_speedup():
    def analytic(history):
        args = dti_minimal.parse_args(TINY + ['--history', history])
        ds = dti_minimal.load_dataset(args)
        sw, dti = (dti_minimal.make_prompts(ds, 0, mode, 5, 10)[0] for mode in ('sw', 'dti'))
        config = dti_minimal.model_config(args)
        return ds, dti_minimal.flops_per_target(sw, config) / dti_minimal.flops_per_target(dti, config)
    short, ratio_short = analytic('18,18')  # ~9 train targets a user: one stream, partly empty
    long, ratio_long = analytic('150,150')  # ~115: mostly full streams of k=10
    assert {len(u) for u in short['users']} == {18} and {len(u) for u in long['users']} == {150}
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

