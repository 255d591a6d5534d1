"""The trainer end to end on tiny synthetic data: it learns, writes results.json, rejects bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import dti_minimal
from model import ctr_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--users', '40', '--n', '5', '--k', '10', '--n-layer', '2', '--n-embd', '32', '--epochs', '1',
        '--batch-size', '64']
KEYS = ['mode', 'dataset', 'n', 'k', 'mask', 'pos', 'n_layer', 'n_head', 'n_embd', 'seed', 'targets_trained',
        'train_seconds', 'time_per_target_ms', 'valid_auc', 'test_auc', 'test_logloss', 'test_f1', 'test_acc',
        'bayes_auc', 'args']


@pytest.mark.parametrize('mode', ['sw', 'dti'])
def test_end_to_end_run_writes_results(mode, tmp_path):
    res = dti_minimal.main(TINY + ['--mode', mode, '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert set(KEYS) <= set(saved) and saved == json.loads(json.dumps(res))
    assert saved['mode'] == mode and saved['args']['k'] == 10 and saved['n'] == 5
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
            return ctr_loss(model(b['idx'], b['item'], b['role']), b['label']).item()
    before = loss()
    trained, seconds, losses = dti_minimal.train(model, prompts, args)
    assert trained == 3 * data.targets_of(prompts) and seconds > 0 and len(losses) > 10
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


@pytest.mark.parametrize('flags,message', [
    (['--k', '0'], '--k must be at least 1'),
    (['--n', '0'], '--n must be at least 1'),
    (['--n-embd', '30', '--n-head', '4'], 'not divisible'),
    (['--mask', 'causal'], "invalid choice: 'causal'"),
    (['--pos', 'learned', '--block-size', '100'], 'longer than --block-size'),
    (['--dataset', 'ml-10m'], "invalid choice: 'ml-10m'"),
])
def test_bad_input_is_one_line_exit_2(flags, message, tmp_path):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, 'dti_minimal.py', *TINY, '--out', str(out), *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (out / 'results.json').exists()
