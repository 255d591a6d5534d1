"""Runs that survive: checkpoints and exact resume after SIGKILL, a non-finite loss, torchrun with
two processes, and the bad-input table (README sums it up: one line naming the problem, exit 2)."""
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import dti_minimal
from conftest import DEVICES, ROOT, TINY, one_line_error

METRICS = ['valid_auc', 'valid_logloss', 'test_auc', 'test_logloss', 'test_f1', 'test_acc', 'first_loss', 'last_loss']


def cli(*flags, timeout=600):
    return subprocess.run([sys.executable, 'dti_minimal.py', *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def results(folder):
    return json.loads((folder / 'results.json').read_text())


@pytest.mark.parametrize('mode', ['dti', 'sw'])  # the sparse path, and the dense one
def test_sigkill_mid_epoch_then_resume_ends_with_the_same_results(tmp_path, mode):
    """With dropout, whose draws depend on the seed, step and rank alone: the resumed run's step
    losses and metrics are the uninterrupted run's, bit for bit."""
    flags = TINY + ['--mode', mode, '--epochs', '2', '--ckpt-every', '5', '--dropout', '0.1']  # dropout: RNG
    assert cli(*flags, '--out', str(tmp_path / 'whole')).returncode == 0
    killed = tmp_path / 'killed'
    p = subprocess.Popen([sys.executable, 'dti_minimal.py', *flags, '--out', str(killed)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / 'ckpt.pt').exists() and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ckpt = torch.load(killed / 'ckpt.pt', weights_only=True)
    whole = torch.load(tmp_path / 'whole' / 'ckpt.pt', weights_only=True)
    assert not (killed / 'results.json').exists()
    assert 0 < len(ckpt['records']) < len(whole['records']) / 2  # mid-epoch: an epoch is half the steps
    r = cli(*flags, '--out', str(killed), '--resume')
    assert r.returncode == 0, r.stderr
    a, b = results(tmp_path / 'whole'), results(killed)
    assert a['targets_trained'] == b['targets_trained'] and a['step_loss'] == b['step_loss']  # bit for bit
    for key in METRICS:
        assert a[key] == b[key], (key, a[key], b[key])


def test_resume_with_seeds_continues_the_seed_it_was_killed_in(tmp_path):
    """--seeds 2: the checkpoint holds the finished seed's results; a run killed in the second
    seed and resumed writes the results.json of an uninterrupted run, both seeds bit for bit."""
    flags = TINY + ['--seeds', '2', '--ckpt-every', '5']
    assert cli(*flags, '--out', str(tmp_path / 'whole')).returncode == 0
    killed = tmp_path / 'killed'
    p = subprocess.Popen([sys.executable, 'dti_minimal.py', *flags, '--out', str(killed)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and not ((killed / 'ckpt.pt').exists() and torch.load(killed / 'ckpt.pt')['seed'] == 1):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ckpt = torch.load(killed / 'ckpt.pt', weights_only=True)
    assert ckpt['seed'] == 1 and len(ckpt['done']) == 1 and not (killed / 'results.json').exists()
    damaged = tmp_path / 'damaged'  # a hand-edited finished seed whose results the report cannot read
    damaged.mkdir()
    del ckpt['done'][0]['test_logits']
    torch.save(ckpt, damaged / 'ckpt.pt')
    r = cli(*flags, '--out', str(damaged), '--resume')
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert "a damaged checkpoint (its finished seeds' results are not this run's)" in r.stderr
    assert sorted(os.listdir(damaged)) == ['ckpt.pt']
    on_a_gpu = tmp_path / 'gpu'  # a first seed trained on a GPU has an mfu where a CPU's is None: it fits
    on_a_gpu.mkdir()
    ckpt = torch.load(killed / 'ckpt.pt', weights_only=True)
    ckpt['done'][0]['mfu'] = 0.25
    torch.save(ckpt, on_a_gpu / 'ckpt.pt')
    assert cli(*flags, '--out', str(on_a_gpu), '--resume').returncode == 0
    ckpt['done'][0]['train_seconds'] = None  # but None where no run writes one is damage
    torch.save(ckpt, damaged / 'ckpt.pt')
    r = cli(*flags, '--out', str(damaged), '--resume')
    assert r.returncode == 2 and "a damaged checkpoint (its finished seeds' results" in r.stderr, r.stderr
    assert cli(*flags, '--out', str(killed), '--resume').returncode == 0
    a, b = results(tmp_path / 'whole'), results(killed)
    assert a['test_auc_seeds'] == b['test_auc_seeds'] and len(set(a['test_auc_seeds'])) == 2
    assert a['baseline_diff_ci'] == b['baseline_diff_ci'] and a['test_auc'] == a['test_auc_seeds'][0]


def test_checkpoint_holds_the_whole_state_and_loads_safely(tmp_path):
    assert cli(*TINY, '--ckpt-every', '7', '--out', str(tmp_path)).returncode == 0
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert set(ckpt) == {'format', 'model', 'optimizer', 'records', 'args', 'data', 'seed', 'done'}
    assert ckpt['args']['n_embd'] == 32
    assert len(ckpt['records']) == results(tmp_path)['steps'] and not list(tmp_path.glob('*.tmp'))


def test_writing_a_checkpoint_is_not_counted_as_training_time(tmp_path, monkeypatch):
    """Each checkpoint write is made to take 3 s: the step times (train_seconds) exclude them."""
    write = dti_minimal.save_checkpoint
    monkeypatch.setattr(dti_minimal, 'save_checkpoint', lambda *a: (write(*a), time.sleep(3)))
    res = dti_minimal.main(TINY + ['--max-train-targets', '200', '--ckpt-every', '2', '--out', str(tmp_path)])
    assert res['steps'] >= 3 and res['train_seconds'] < 3


@pytest.mark.parametrize('flags,message', [
    (['--weight-decay', '1e300', '--batch-size', '20', '--ckpt-every', '1'], 'the weights are not finite after step 1'),
    (['--lr', '1e9', '--max-train-targets', '20', '--batch-size', '20'], 'the trained model gives non-finite logits'),
    (['--lr', '1e3'], 'the loss is nan at step'),
])
def test_diverging_runs_stop_in_one_line_and_never_save_non_finite_weights(flags, message, tmp_path):
    """A weight decay that blows the weights up in one step, a learning rate whose model gives NaN
    logits, or one whose loss turns NaN: one line (exit 1), nothing on stderr but it, and any
    checkpoint on disk holds finite weights only."""
    r = cli(*TINY, *flags, '--out', str(tmp_path))
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr
    if (tmp_path / 'ckpt.pt').exists():
        assert all(torch.isfinite(w).all() for w in torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model'].values())
        if 'logits' in message:  # the run finished its steps: --resume goes straight to the same one line
            again = cli(*TINY, *flags, '--out', str(tmp_path), '--resume')
            assert again.returncode == 1 and again.stderr == r.stderr


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    r = cli(*TINY, '--lr', '1e9', '--ckpt-every', '1', '--out', str(tmp_path))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
    assert 'the loss is nan at step' in r.stderr and f'last good checkpoint is {tmp_path}' in r.stderr
    step = int(r.stderr.split('at step ')[1].split()[0])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert len(ckpt['records']) == step - 1 and all(torch.isfinite(torch.tensor(x[2])) for x in ckpt['records'])
    assert all(torch.isfinite(w).all() for w in ckpt['model'].values())
    assert not (tmp_path / 'results.json').exists()


def test_torchrun_two_processes_match_one_process(tmp_path):
    """Same global batches: the two ranks' shares of each batch, gradients averaged by DDP (gloo).
    Only the order of float32 sums differs (gradients over ranks, losses per rank), about 1e-7
    per step; at this learning rate training is stable, so the metrics agree to 1e-5. (At lr 3e-3
    this tiny run has a loss spike that amplifies any reordering of sums, one process or two.)"""
    flags = TINY
    one = cli(*flags, '--out', str(tmp_path / 'one'))
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--',
                          'dti_minimal.py', *flags, '--out', str(tmp_path / 'two')],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = results(tmp_path / 'one'), results(tmp_path / 'two')
    assert a['targets_trained'] == b['targets_trained']
    for key in METRICS:
        assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])
    assert two.stdout.count(' users, ') == 1 and two.stdout.count('wrote ') == 1  # only rank 0 prints


def torchrun(*flags):
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             '--', 'dti_minimal.py', *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_torchrun_with_dropout_resumes_bit_for_bit_and_says_bad_input_once(tmp_path):
    """Each rank draws its own dropout: a checkpoint taken mid-run (copied as the run goes on) and
    resumed on two processes ends with the uninterrupted run's step losses and metrics. A bad flag
    is one line from rank 0, not one per rank."""
    flags = TINY + ['--epochs', '2', '--ckpt-every', '2', '--dropout', '0.1']
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    cut.mkdir()
    p = torchrun(*flags, '--out', str(whole))
    while p.poll() is None and not (whole / 'ckpt.pt').exists():
        time.sleep(0.005)
    (cut / 'ckpt.pt').write_bytes((whole / 'ckpt.pt').read_bytes())  # os.replace: a whole file
    err = p.communicate(timeout=600)[1]  # reads the pipes to the end: a full pipe would block the run
    assert p.returncode == 0, err[-2000:]
    steps = len(torch.load(cut / 'ckpt.pt', weights_only=True)['records'])
    assert 0 < steps < results(whole)['steps']
    r = torchrun(*flags, '--out', str(cut), '--resume')
    err = r.communicate(timeout=600)[1]
    assert r.returncode == 0, err[-2000:]
    a, b = results(whole), results(cut)
    assert a['step_loss'] == b['step_loss'] and all(a[key] == b[key] for key in METRICS)
    err = torchrun(*TINY, '--lr', '-1', '--out', str(tmp_path / 'bad')).communicate(timeout=600)[1]
    assert err.count('dti_minimal.py: error: --lr must be a finite number > 0') == 1


# -----------------------------------------------------------------------------
# the bad-input table (README's bad-input summary sums it up)


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ckpt')
    assert dti_minimal.main(TINY + ['--max-train-targets', '200', '--out', str(folder)])
    return folder


BAD = [
    (['--mask', 'causal'], "argument --mask: invalid choice: 'causal'"),
    (['--k', '0'], 'argument --k: must be at least 1'),
    (['--k', 'ten'], 'argument --k: takes whole numbers'),
    (['--k', '5,10'], 'use it with --mode compare'),
    (['--mode', 'compare', '--k', '5,10,5'], 'argument --k: 5 is listed more than once'),
    (['--n', '0'], '--n must be at least 1'),
    (['--n-layer', '-2'], '--n-layer must be at least 1'),
    (['--batch-size', '0'], '--batch-size must be at least 1'),
    (['--max-train-targets', '0'], '--max-train-targets must be at least 1'),
    (['--max-eval-targets', '-3'], '--max-eval-targets must be at least 1, got -3'),
    (['--ckpt-every', '-1'], '--ckpt-every must be 0 or more'),
    (['--n-embd', '4000000', '--n-head', '1'], 'needs'),
    (['--users', '100000000'], 'at most 100000'),
    (['--history', '90'], 'argument --history: takes MIN,MAX'),
    (['--history', '120,60'], 'argument --history: needs 1 <= MIN <= MAX'),
    (['--users', '100000', '--history', '60,200'], 'at most 12000000'),
    (['--n-embd', '30', '--n-head', '4'], 'not divisible'),
    (['--pos', 'learned', '--block-size', '100'], 'longer than --block-size 100'),
    (['--mode', 'ablation', '--block-size', str(10**12)], 'parameters needs'),  # its learned-position rows
    (['--dataset', 'ml-10m'], "invalid choice: 'ml-10m'"),
    (['--dataset', 'ml-100k', '--data-dir', '/nonexistent/ml'], '--data-dir /nonexistent/ml does not exist'),
    (['--out', '/proc/version/out'], 'cannot be written'),
    (['--device', 'gpu7'], "unknown --device 'gpu7'"),
    (['--device', 'meta'], 'use auto, cpu, cuda, cuda:N or mps'),
    (['--resume'], '--resume: no checkpoint at'),
    (['--resume', '--mode', 'compare'], '--resume continues a --mode sw or dti run'),
    (['--resume', '--mode', 'ablation'], '--resume continues a --mode sw or dti run'),
    # non-finite or out-of-range numbers, refused before any work
    (['--lr', 'inf'], '--lr must be a finite number > 0, got inf'),
    (['--lr', 'nan'], '--lr must be a finite number > 0, got nan'),
    (['--weight-decay', 'nan'], '--weight-decay must be a finite number >= 0, got nan'),
    (['--weight-decay', '-1'], '--weight-decay must be a finite number >= 0, got -1.0'),
    (['--dropout', 'nan'], '--dropout must be in [0, 1), got nan'),
    (['--seed', '-1'], '--seed must be in 0 .. 2**63-1, got -1'),
    (['--seed', str(2**64)], f'--seed must be in 0 .. 2**63-1, got {2**64}'),
    # flags that would ask for unbounded work or memory
    (['--n', str(10**12)], f'--n {10**12}: no synthetic user has more than 120 interactions'),
    (['--mode', 'bench', '--n', str(10**6)], '--n at most 500, got 1000000'),
    (['--epochs', str(10**9)], '000000000 stream draws before step 1, more than 10000000'),
    # output folders that cannot take the results
    (['--out', ''], '--out must name a folder'),
    (['--out', '/proc/x'], 'output folder /proc/x cannot be written'),
    (['--out', '/proc/x\ny'], 'output folder /proc/x\\ny cannot be written'),  # still one line
    (['--attn', 'flex', '--device', 'cpu'], '--attn flex trains on CUDA only: FlexAttention has no backward on a CPU'),
    # counts far beyond any plan, bounded once (BOUNDS): one line, not an overflow deep inside numpy
    (['--k', str(10**20)], 'argument --k: must be at least 1 and at most 100000'),
    (['--max-train-targets', str(10**20)], f'--max-train-targets must be at most 1000000000000, got {10**20}'),
    (['--max-train-targets', str(2**63 - 8)], '--max-train-targets must be at most 1000000000000'),
    (['--max-eval-targets', str(10**20)], '--max-eval-targets must be at most 1000000000000'),
    (['--max-eval-targets', str(2**63 - 8)], '--max-eval-targets must be at most 1000000000000'),
    (['--dataset', 'ml-100k', '--n', str(10**20)], f'--n must be at most 100000, got {10**20}'),
    (['--seeds', '0'], '--seeds must be at least 1, got 0'),
    (['--mode', 'bench', '--pos', 'learned'], 'a prompt of 3124 tokens is longer than --block-size 2048'),
    (['--data-dir', '/tmp'], '--data-dir is for MovieLens; --dataset synthetic is generated here'),
    (['--mode', 'bench', '--dataset', 'ml-100k', '--data-dir', '/tmp'], '--data-dir: --mode bench times a generated'),
    (['--out', '/tmp/' + 'x' * 300], 'cannot be written'),  # a name too long for the file system
]


@pytest.mark.parametrize('flags,message', BAD, ids=[' '.join(f) for f, _ in BAD])
def test_bad_input_is_one_line_exit_2(flags, message, tmp_path, capsys):
    out = tmp_path / 'out'
    assert message in one_line_error(capsys, TINY + ['--out', str(out), *flags])
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing written, not even the folder


def test_odd_but_good_flags_are_taken(tmp_path):
    """ALiBi has no position table, so a huge --block-size costs nothing; --weight-decay 0 is plain Adam."""
    args = dti_minimal.parse_args(TINY + ['--block-size', str(10**9), '--weight-decay', '0'])
    assert sum(p.numel() for p in dti_minimal.build_model(args, 'dti', 0).parameters()) < 3e6


@pytest.mark.parametrize('mode,name', [('dti', 'ckpt.pt'), ('dti', 'results.json'), ('dti', 'ckpt.pt.tmp'),
                                       ('compare', 'compare.json')])
def test_an_output_file_shadowed_by_a_folder_is_refused_before_training(mode, name, tmp_path, capsys):
    (tmp_path / name).mkdir()
    assert f'{tmp_path / name} exists and is not a file' in one_line_error(
        capsys, TINY + ['--mode', mode, '--out', str(tmp_path)])
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize('mode', ['compare', 'ablation', 'bench'])
def test_torchrun_runs_sw_or_dti_only(mode, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv('RANK', '0')  # what torchrun sets; refused before joining any process group
    assert f'torchrun runs --mode sw or dti, not {mode}' in one_line_error(
        capsys, TINY + ['--mode', mode, '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


def test_no_cuda_device_here(capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    assert 'no such CUDA device here' in one_line_error(capsys, ['--device', 'cuda'])


@pytest.mark.parametrize('flags,message', [
    (['--n-embd', '64'], '--resume: --n-embd 64 changes the model shape (the checkpoint has 32)'),
    (['--pos', 'learned'], '--resume: --pos learned changes the model shape'),
    (['--lr', '0.01'], '--resume: --lr 0.01 differs from the checkpoint (0.001)'),
    (['--k', '7'], '--resume: --k 7 differs from the checkpoint (10)'),
    (['--seeds', '2'], '--resume: --seeds 2 differs from the checkpoint (1)'),
    (['--eval-mode', 'dti'], '--resume: --eval-mode dti differs from the checkpoint (sw)'),
    (['--max-eval-targets', '50'], '--resume: --max-eval-targets 50 differs from the checkpoint (not given)'),
])
def test_resume_with_other_arguments(flags, message, checkpoint_dir, capsys):
    before = hashlib.sha256((checkpoint_dir / 'ckpt.pt').read_bytes()).hexdigest()
    assert message in one_line_error(capsys, TINY + ['--max-train-targets', '200', '--out', str(checkpoint_dir),
                                                     '--resume', *flags])
    assert hashlib.sha256((checkpoint_dir / 'ckpt.pt').read_bytes()).hexdigest() == before


@pytest.mark.parametrize('content,message', [
    (b'not a checkpoint', 'not a readable checkpoint'),
    (None, 'not a dti-minimal checkpoint'),
    ('v2', 'not a dti-minimal checkpoint (dti-minimal checkpoint v3)'),  # older: its dropout drew otherwise
])
def test_corrupt_or_foreign_checkpoint(content, message, tmp_path, capsys):
    if content in (None, 'v2'):
        torch.save({'model': {}, 'format': 'someone else' if content is None else 'dti-minimal checkpoint v2'},
                   tmp_path / 'ckpt.pt')
    else:
        (tmp_path / 'ckpt.pt').write_bytes(content)
    assert message in one_line_error(capsys, TINY + ['--out', str(tmp_path), '--resume'])
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt']


def _no_records(c):
    c['records'] = []


def _truncated_weights(c):
    c['model'].pop('transformer.h.1.attn.c_attn.weight')


def _wrong_shape(c):
    c['model']['transformer.ln_f.weight'] = torch.ones(5)


def _foreign_optimizer(c):  # the state of another model's AdamW: right groups, wrong shapes
    for state in c['optimizer']['state'].values():
        state['exp_avg'] = torch.zeros(3, 3)


def _sgd_optimizer(c):
    c['optimizer'] = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1).state_dict()


def _record(value, field=2):  # field 2: the loss, 1: the step's target count
    def damage(c):
        record = list(c['records'][1])
        record[field] = value
        c['records'][1] = tuple(record)
    return damage


@pytest.mark.parametrize('damage,message', [
    (lambda c: c.pop('optimizer'), "a damaged checkpoint ('optimizer' is missing or not a dict)"),
    (lambda c: c.update(seed='7'), "a damaged checkpoint ('seed' is missing or not a int)"),
    (_no_records, 'does not fit this run (0 step records in a run of'),
    (_truncated_weights, 'does not fit this run (Error(s) in loading state_dict for GPT: Missing key(s)'),
    (_wrong_shape, 'does not fit this run (Error(s) in loading state_dict for GPT: size mismatch'),
    (_foreign_optimizer, 'does not fit this run (an optimizer state of shape (3, 3)'),
    (_sgd_optimizer, 'does not fit this run ('),
    (_record('0.5'), 'step records in a run of 3 steps, or one no step writes'),
    (_record(None), 'step records in a run of 3 steps, or one no step writes'),
    (_record(float('nan')), 'step records in a run of 3 steps, or one no step writes'),
    (_record(0, field=1), 'step records in a run of 3 steps, or one no step writes'),
    (lambda c: c['model'].update({'transformer.ln_f.weight': c['model']['transformer.ln_f.weight'] * float('nan')}),
     'does not fit this run (non-finite weights)'),
    (lambda c: c.update(done=['x']), 'a damaged checkpoint (seed 0 after 1 finished seeds from --seed 0)'),
    (lambda c: c.update(seed=5), 'a damaged checkpoint (seed 5 after 0 finished seeds from --seed 0)'),
    (lambda c: c['args'].update(n_layer=torch.tensor([2, 2])), 'a damaged checkpoint (a tensor among its flags)'),
], ids=['missing key', 'wrong type', 'no records', 'truncated weights', 'wrong shape', 'foreign AdamW', 'SGD',
        'loss a string', 'loss None', 'loss NaN', 'no targets', 'NaN weights',
        'a finished seed no run wrote', 'a seed outside the run', 'a tensor flag'])
def test_a_damaged_checkpoint_is_one_line(damage, message, checkpoint_dir, tmp_path, capsys):
    ckpt = torch.load(checkpoint_dir / 'ckpt.pt', weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    assert message in one_line_error(capsys, TINY + ['--max-train-targets', '200', '--out', str(tmp_path), '--resume'])
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt']


def ctrl_c_reaches_it():
    """A shell starts background jobs with SIGINT ignored, and Python keeps that: undo it in the child,
    so that these tests pass however pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_the_run_resumes(tmp_path):
    flags = TINY + ['--epochs', '2', '--ckpt-every', '5', '--out', str(tmp_path)]
    p = subprocess.Popen([sys.executable, 'dti_minimal.py', *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it)
    while not (tmp_path / 'ckpt.pt').exists() and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    lines = [line for line in err.splitlines() if 'it/s' not in line and 'target/s' not in line and line.strip()]
    assert p.returncode == 130 and 'Traceback' not in err, err
    assert lines[-1] == f'dti_minimal.py: error: interrupted; rerun with --resume to continue from {tmp_path / "ckpt.pt"}'
    assert not list(tmp_path.glob('*.tmp')) and not (tmp_path / 'results.json').exists()
    r = cli(*flags, '--resume')
    assert r.returncode == 0, r.stderr
    assert results(tmp_path)['steps'] == len(torch.load(tmp_path / 'ckpt.pt', weights_only=True)['records'])  # all


def test_ctrl_c_while_a_checkpoint_loads_is_one_line(checkpoint_dir, monkeypatch, capsys):
    """A large checkpoint takes a while to load, before any training: Ctrl-C there is one line too,
    which offers --resume only to the run that was resuming (a fresh run may be loading another's)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'load', interrupted)
    for flags, then in ([['--resume'], f'rerun with --resume to continue from {checkpoint_dir / "ckpt.pt"}'],
                        [[], 'no checkpoint was written']):
        with pytest.raises(SystemExit) as e:
            dti_minimal.main(TINY + ['--max-train-targets', '200', '--out', str(checkpoint_dir), *flags])
        assert e.value.code == 130 and capsys.readouterr().err == f'dti_minimal.py: error: interrupted; {then}\n'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('attn', ['sparse', 'dense'])
def test_bf16_autocast_runs_both_attention_paths(attn, device):
    """What --device cuda does to the forward pass (on a CPU, its bf16 autocast stands in): both
    paths run, logits stay within bf16 round-off of fp32, gradients are finite."""
    import data
    from model import ctr_loss
    args = dti_minimal.parse_args(TINY + ['--attn', attn, '--device', device])
    ds = data.synthetic(n_users=10, n=args.n)
    b = {key: v.to(device) for key, v in data.collate(ds, dti_minimal.split_prompts(ds, 0, 'dti', args.n, 10)[0][:4]).items()}
    model = dti_minimal.build_model(args, 'dti', 0)
    full = model(b['idx'], b['block'], b['role'])
    with torch.autocast(device, dtype=torch.bfloat16):
        half = model(b['idx'], b['block'], b['role'])
        loss = ctr_loss(half, b['label'])
    loss.backward()
    assert half.dtype == torch.bfloat16 and (half.float() - full).abs().max() < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compile_trains_end_to_end_without_graph_breaks_or_recompiles(tmp_path, monkeypatch):
    """--compile on the CPU: the attention plan is built before each step, so the compiled model
    is one graph (dynamic shapes, token lengths padded to multiples of 128) that no batch breaks;
    on the dense path no batch recompiles it either (the sparse path's tile counts are shapes of
    their own: it recompiles when they change). torch's own logs, switched on here, would say so.
    A tiny run trains, evaluates and writes its results."""
    monkeypatch.setenv('TORCH_LOGS', 'graph_breaks,recompiles')
    r = cli(*TINY, '--compile', '--attn', 'dense', '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Graph break' not in r.stderr and 'Recompiling' not in r.stderr, r.stderr[-3000:]
    res = results(tmp_path)
    assert res['args']['compile'] and 0.5 < res['test_auc'] <= 1 and res['last_loss'] < res['first_loss']


# -----------------------------------------------------------------------------
# the output folder: one run at a time, never another run's checkpoint, a full disk


def test_a_fresh_run_never_replaces_another_runs_checkpoint(checkpoint_dir, tmp_path, capsys):
    """Other flags into a folder that holds a checkpoint: refused, naming --resume and --out; the
    same flags: the run starts over (it recomputes the same run)."""
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'ckpt.pt').write_bytes((checkpoint_dir / 'ckpt.pt').read_bytes())
    before = (folder / 'ckpt.pt').read_bytes()
    err = one_line_error(capsys, TINY + ['--max-train-targets', '200', '--n-embd', '64', '--out', str(folder)])
    assert 'holds another run (--n-embd 32, here 64); continue it with its flags and --resume, or pass another --out' in err
    assert (folder / 'ckpt.pt').read_bytes() == before and sorted(os.listdir(folder)) == ['ckpt.pt']
    (folder / 'ckpt.pt').write_bytes(b'someone else\'s file')
    assert 'is not a checkpoint of this program; remove it or pass another --out' in one_line_error(
        capsys, TINY + ['--out', str(folder)])
    (folder / 'ckpt.pt').write_bytes(before)
    assert dti_minimal.main(TINY + ['--max-train-targets', '200', '--out', str(folder)])['steps'] > 0


def test_a_lock_made_but_not_written_is_one_line_and_removed(tmp_path, monkeypatch, capsys):
    """On a full disk a lock file can be made but not written: one line (exit 1), no empty lock left.
    An --out that is a file is one line before any work."""
    class FullDisk(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(dti_minimal, 'open', lambda path, mode: FullDisk(path, mode), raising=False)
    with pytest.raises(SystemExit) as e:
        dti_minimal.lock(str(tmp_path))
    assert e.value.code == 1 and not os.listdir(tmp_path)
    assert capsys.readouterr().err == f'dti_minimal.py: error: cannot write {tmp_path / ".lock"} (No space left ' \
                                      f'on device); stopped\n'
    (tmp_path / 'a_file').write_text('')
    assert f'--out {tmp_path / "a_file"} is a file, not a folder' in one_line_error(capsys, ['--out', str(tmp_path / 'a_file')])


def test_one_run_holds_its_folder(tmp_path, capsys):
    """A lock file whose run is alive refuses a second run in one line; a stale one (its process
    gone) is taken over, and released when the run ends."""
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / '.lock').write_text(str(sleeper.pid))
        err = one_line_error(capsys, TINY + ['--max-train-targets', '200', '--out', str(tmp_path)])
        assert f'{tmp_path} is in use by another run (pid {sleeper.pid}' in err and 'pass another --out' in err
        assert sorted(os.listdir(tmp_path)) == ['.lock']
    finally:
        sleeper.kill()
        sleeper.wait()
    dti_minimal.main(TINY + ['--max-train-targets', '200', '--out', str(tmp_path)])  # the lock is stale now
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'results.json']


def test_the_lock_knows_its_holder(tmp_path, monkeypatch, capsys):
    """The process that holds a folder may lock it again (a notebook running compare twice); an
    empty lock file is read again until its run has written its pid; a live process of another
    user (kill(pid, 0) raises PermissionError) holds it; a negative pid is no process, so stale."""
    folder = str(tmp_path)
    dti_minimal.lock(folder)
    dti_minimal.lock(folder)
    dti_minimal.unlock()
    assert os.listdir(tmp_path) == []
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / '.lock').write_text('')
        threading.Timer(0.1, (tmp_path / '.lock').write_text, [str(sleeper.pid)]).start()
        with pytest.raises(SystemExit) as stop:
            dti_minimal.lock(folder)
        assert stop.value.code == 2 and f'is in use by another run (pid {sleeper.pid}' in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / '.lock').write_bytes(b'\xff\xfe')  # not a pid: stale
    dti_minimal.lock(folder)
    dti_minimal.unlock()
    (tmp_path / '.lock').write_text('-1')
    dti_minimal.lock(folder)
    assert (tmp_path / '.lock').read_text() == str(os.getpid())
    dti_minimal.unlock()
    (tmp_path / '.lock').write_text('4321')

    def kill(pid, sig):
        raise PermissionError(f'pid {pid} runs as another user')
    monkeypatch.setattr(os, 'kill', kill)
    with pytest.raises(SystemExit):
        dti_minimal.lock(folder)
    assert 'is in use by another run (pid 4321' in capsys.readouterr().err
    os.remove(tmp_path / '.lock')
    os.mkfifo(tmp_path / '.lock')  # reading it would wait for a writer forever
    err = one_line_error(capsys, TINY + ['--out', folder])
    assert f"{tmp_path / '.lock'} exists and is not a file" in err


def test_scored_targets_of_one_class_are_a_warning_once(tmp_path, capsys):
    """--max-eval-targets 1 scores one target a split: its AUC is undefined (null), which compare
    says once per split, though it prepares those targets for every row. (And --out a/made/../out
    is a/out: no folder a/made is left.)"""
    out = os.path.join(tmp_path, 'made', '..', 'out')  # and a/made/../out makes a/out only
    res = dti_minimal.main(TINY + ['--mode', 'compare', '--k', '5,10', '--max-eval-targets', '1', '--out', out])
    err = capsys.readouterr().err
    assert res['sw_test_auc'] is None and res['sweep'][1]['dti_test_auc'] is None
    assert err.count('warning: the test targets are all') == 1 and err.count('warning: the valid targets are all') == 1
    assert os.listdir(tmp_path) == ['out']


def test_two_runs_started_together_on_one_folder(tmp_path):
    """The race that once ended in FileNotFoundError on ckpt.pt.tmp: one run trains, the other
    refuses in one line, and what is on disk is the first run's, whole."""
    flags = [*TINY, '--ckpt-every', '1', '--out', str(tmp_path)]
    runs = [subprocess.Popen([sys.executable, 'dti_minimal.py', *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=600), p.stderr.read()) for p in runs)
    (ok, _), (refused, err) = outcomes
    assert ok == 0 and refused == 2 and err.count('\n') == 1 and 'is in use by another run' in err, outcomes
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'results.json']


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    saved, real = [], torch.save

    def save(obj, path):
        if saved:  # the second checkpoint: the disk is full half-way through the file
            open(path, 'wb').write(b'half')
            raise RuntimeError('[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file '
                               'data/3: file write failed')
        saved.append(path)
        real(obj, path)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(SystemExit) as e:
        dti_minimal.main(TINY + ['--ckpt-every', '3', '--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and 'Traceback' not in err
    assert f'cannot write {tmp_path / "ckpt.pt"} (' in err and 'file write failed); stopped, the previous' in err
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt'] and len(torch.load(tmp_path / 'ckpt.pt')['records']) == 3


def test_ctrl_c_while_the_modules_import_is_one_line(tmp_path):
    p = subprocess.Popen([sys.executable, 'dti_minimal.py', '--out', str(tmp_path / 'out')], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it)
    time.sleep(0.4)  # importing torch alone takes longer than this
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err == 'dti_minimal.py: error: interrupted; nothing was written\n', err
    assert not (tmp_path / 'out').exists()
