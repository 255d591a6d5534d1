"""
Train a from-scratch GPT for CTR prediction with sliding-window prompts (SW) or Dynamic Target
Isolation streams (DTI), evaluate it, and write DIR/results.json.

    python dti_minimal.py --mode dti            # n=20 context blocks, k=50 targets per stream
    python dti_minimal.py --mode sw             # the same model and data, one prompt per target
    python dti_minimal.py --mode compare        # both, same init and targets: DIR/compare.json
    python dti_minimal.py --mode compare --k 1,5,10,20,50,100 --max-train-targets 3000  # k sweep
    python dti_minimal.py --mode ablation --max-train-targets 8000  # the paper's ablation: DIR/ablation.json
    python dti_minimal.py --mode bench --mask window   # block-sparse vs dense attention: DIR/bench.json

The file reads top to bottom: flags, data, training, evaluation, experiments (one run, compare,
ablation, bench), plumbing (checkpoints, distributed runs, output).
"""
import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from tqdm import tqdm

import data
from model import GPT, GPTConfig, ctr_loss, to_device, training_flops

DATASETS = ['synthetic', 'synthetic-future', 'synthetic-far', 'ml-100k', 'ml-1m', 'ml-20m', 'ml-25m']
MAX_PLANNED_UNITS = 10_000_000  # epochs x streams: the batch plan of a run is held in memory
BENCH_MAX_N = 500  # --mode bench: one stream of n + 440 blocks, dense attention over all of it
RANK, WORLD = 0, 1  # this process's rank and the number of processes (torchrun sets them, see main)

# -----------------------------------------------------------------------------
# flags


def die(msg, code=2):
    """Bad input (exit code 2) or a failed run (1): one line on stderr, no traceback."""
    print(f'dti_minimal.py: error: {msg}', file=sys.stderr)
    sys.exit(code)


def k_list(text):
    """'50' -> [50]; '1,5,50' -> [1, 5, 50] (a k sweep)."""
    try:
        ks = [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'takes whole numbers separated by commas, got {text!r}')
    if min(ks) < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {text}')
    return ks


def history_range(text):
    """'60,120' -> (60, 120): the fewest and most interactions of a synthetic user."""
    try:
        lo, hi = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'takes MIN,MAX (two whole numbers), got {text!r}')
    if not 1 <= lo <= hi <= 100_000:
        raise argparse.ArgumentTypeError(f'needs 1 <= MIN <= MAX <= 100000, got {text}')
    return lo, hi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = die  # one line, exit 2, also for argparse's own complaints
    add = p.add_argument
    # what to run
    add('--mode', choices=['sw', 'dti', 'compare', 'ablation', 'bench'], default='dti',
        help='training paradigm; compare: SW and DTI step for step; ablation: masks x positions x k; '
             'bench: sparse vs dense attention')
    add('--out', default='out', help='output folder for results.json (compare.json, bench.json) and ckpt.pt')
    # data
    add('--dataset', choices=DATASETS, default='synthetic',
        help='data set; the synthetic -future / -far variants are leakage canaries')
    add('--data-dir', default=None, help='MovieLens: a GroupLens folder or zip, or RecBole atomic files '
                                         '(default: $DTI_DATA, ~/.cache/dti-minimal, else download there)')
    add('--users', type=int, default=600, help='number of synthetic users')
    add('--history', type=history_range, default=(60, 120), metavar='MIN,MAX',
        help='interactions per synthetic user, drawn uniformly from MIN..MAX')
    add('--n', type=int, default=20, help='context blocks each target sees')
    add('--k', type=k_list, default=None,
        help='targets per DTI stream (default 50); with --mode compare or ablation a list such as 1,5,50 '
             'sweeps k (ablation default: 5,50)')
    add('--max-train-targets', type=int, default=None, help='train on the first N targets only')
    add('--max-eval-targets', type=int, default=None, help='score valid and test on their first N targets only')
    # model
    add('--mask', choices=['isolated', 'window'], default='isolated',
        help="attention mask: 'isolated' (exact target isolation) or 'window' (windowed causal, leaks with depth)")
    add('--pos', choices=['alibi', 'learned'], default='alibi',
        help='positions: ALiBi relative bias, or learned absolute embeddings (nanoGPT wpe)')
    add('--n-layer', type=int, default=2, help='transformer layers')
    add('--n-head', type=int, default=4, help='attention heads')
    add('--n-embd', type=int, default=64, help='embedding width C')
    add('--block-size', type=int, default=2048, help='longest prompt in tokens (bounds learned positions only)')
    add('--dropout', type=float, default=0.0, help='dropout rate')
    add('--attn', choices=['auto', 'sparse', 'dense', 'flex'], default='auto',
        help='attention path: block-sparse tiles, one dense SDPA call (the reference), FlexAttention '
             '(CUDA), or auto: time the exact paths (flex too on CUDA) on the run\'s first batches '
             'and train on the fastest')
    # training
    add('--epochs', type=int, default=4, help='passes over the training targets')
    add('--batch-size', type=int, default=256, help='targets per optimizer step, both modes')
    add('--lr', type=float, default=3e-3, help='peak learning rate (AdamW; warm-up, then cosine decay)')
    add('--weight-decay', type=float, default=0.01, help='AdamW weight decay of matrices and embeddings')
    add('--seed', type=int, default=0, help='model init and shuffling (the data is fixed)')
    add('--device', default='auto', help='auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps')
    add('--compile', action='store_true', help='torch.compile the model for training')
    add('--ckpt-every', type=int, default=200, help='write DIR/ckpt.pt every N steps (0: at the end only)')
    add('--resume', action='store_true', help='continue the run whose checkpoint is DIR/ckpt.pt')
    # evaluation
    add('--eval-mode', choices=['sw', 'dti'], default='sw',
        help='score valid/test targets with SW prompts (default) or DTI streams')
    return check_args(p.parse_args(argv))


def check_args(args):
    """Everything about the flags that can be checked before any work: one line and exit 2, else
    the arguments with --k made a single number outside a sweep and --device resolved."""
    sweep = args.mode in ('compare', 'ablation')
    args.k = args.k or ([5, 50] if args.mode == 'ablation' else [50])
    if len(args.k) > 1 and not sweep:
        die('a list of k values is a sweep: use it with --mode compare or ablation')
    if not sweep:
        args.k = args.k[0]  # a list only for a sweep
    for name in ('max_train_targets', 'max_eval_targets'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ('users', 'n', 'n_layer', 'n_head', 'n_embd', 'block_size', 'epochs', 'batch_size'):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.ckpt_every < 0:
        die(f'--ckpt-every must be 0 or more, got {args.ckpt_every}')
    if args.users > 100_000:
        die(f'--users {args.users} is more synthetic users than this script generates (at most 100000)')
    if args.users * args.history[1] > 12_000_000:
        die(f'--users {args.users} --history {args.history[0]},{args.history[1]} allows '
            f'{args.users * args.history[1]} interactions, more than this script generates (at most 12000000)')
    if args.n_embd % args.n_head:
        die(f'--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}')
    if args.mode == 'bench' and args.n > BENCH_MAX_N:
        die(f'--mode bench times dense attention over n + 440 blocks, quadratic in n: '
            f'--n at most {BENCH_MAX_N}, got {args.n}')
    if args.mode != 'bench' and args.dataset.startswith('synthetic') and args.n >= args.history[1]:
        die(f'--n {args.n}: no synthetic user has more than {args.history[1]} interactions (--history), '
            f'so none has a target')
    params = (data.VOCAB_SIZE * args.n_embd + args.n_layer * 12 * args.n_embd ** 2
              + (args.block_size * args.n_embd if args.pos == 'learned' else 0))  # ALiBi has no position table
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if 16 * params > memory:  # weights, gradients and AdamW's two moments in fp32
        die(f'a model of {params / 1e9:.1f}B parameters needs {16 * params / 2**30:.0f} GiB to train, '
            f'more than this machine\'s {memory / 2**30:.0f} GiB')
    if not (math.isfinite(args.lr) and args.lr > 0):
        die(f'--lr must be a finite number > 0, got {args.lr}')
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        die(f'--weight-decay must be a finite number >= 0, got {args.weight_decay}')
    if not 0 <= args.dropout < 1:  # also refuses nan
        die(f'--dropout must be in [0, 1), got {args.dropout}')
    if not 0 <= args.seed < 2**63:
        die(f'--seed must be in 0 .. 2**63-1, got {args.seed}')
    if not args.out.strip():
        die('--out must name a folder')
    if args.device == 'auto':
        args.device = ('cuda' if torch.cuda.is_available() else
                       'mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        die(f'unknown --device {args.device!r}')
    if device.type not in ('cpu', 'cuda', 'mps'):
        die(f'--device {args.device}: use auto, cpu, cuda, cuda:N or mps')
    if device.type == 'cuda' and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        die(f'--device {args.device}: no such CUDA device here')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        die(f'--device {args.device}: no MPS device here')
    if args.attn == 'flex' and device.type != 'cuda':
        die('--attn flex trains on CUDA only: FlexAttention has no backward on a CPU in torch 2.13 '
            '(use --attn auto, sparse or dense)')
    if args.attn == 'flex' and args.dropout:
        die('--attn flex has no dropout: use --dropout 0 or another --attn')
    return args

# -----------------------------------------------------------------------------
# data


def load_dataset(args):
    """The data set, its statistics printed; bad or missing MovieLens files are a one-line error."""
    if args.dataset.startswith('ml-'):
        try:
            ds = data.movielens(args.dataset, args.data_dir)
        except data.DataError as e:
            die(str(e))
    else:
        ds = data.synthetic(n_users=args.users, min_len=args.history[0], max_len=args.history[1], n=args.n,
                            canary=args.dataset.partition('-')[2] or None)
    print(data.describe(ds, args.n))
    target = data.positions(ds) >= args.n
    for split, name in ((0, 'train'), (1, 'valid'), (2, 'test')):  # a split without targets fails in prepare
        labels = np.unique(ds['label'][target & (ds['split'] == split)])
        word = 'positive' if len(labels) == 1 and labels[0] else 'negative'
        if len(labels) == 1 and split == 0:
            die(f'{ds["name"]}: the train targets are all {word}; nothing to learn')
        if len(labels) == 1:
            warn(f'the {name} targets are all {word}: their AUC is undefined, null in the results')
    return ds


def make_prompts(ds, split, mode, n, k, max_targets=None):
    """References (data.sw_refs, data.dti_refs) to the prompts (SW) or streams (DTI) whose targets
    are the interactions of `split` (the first max_targets of them, if given), and the targets'
    true click probabilities in order."""
    runs, prob = data.segments(ds, split, n)
    if max_targets is not None:
        targets = runs[:, 1] - runs[:, 0] - n                                  # (runs,)
        before = np.cumsum(targets) - targets                                  # targets in earlier runs
        keep = before < max_targets
        runs = np.stack([runs[keep, 0], np.minimum(runs[keep, 1], runs[keep, 0] + n + max_targets - before[keep])], 1)
        prob = prob[:max_targets]
    return (data.sw_refs(runs, n) if mode == 'sw' else data.dti_refs(runs, n, k)), prob


def train_units(ds, n, k, max_targets=None):
    """The training targets in units of one DTI stream each, as stream references. A DTI step
    trains on a batch of units' streams, an SW step on the SW prompts of exactly those targets
    (unit_prompts), and batches are drawn over units: with the same seed SW step j trains on the
    targets of DTI step j, one training run computed two ways."""
    return make_prompts(ds, 0, 'dti', n, k, max_targets)[0]


def unit_prompts(units, mode, n):
    """The prompt references a batch of units trains on: the streams themselves (DTI), or one SW
    prompt per target of theirs, in the same target order (SW)."""
    return units if mode == 'dti' else data.sw_refs(np.stack([units[:, 2] - n, units[:, 1]], axis=1), n)


def batches(units, batch_targets, rng):
    """Shuffled batches (arrays of unit indices) of whole units holding at least batch_targets
    targets, or what is left at the end of a pool. Units with as many targets go together (sorted
    inside shuffled pools of ~32 batches), so little is padding: full streams with full ones, a
    user's shorter last stream with its likes. The draw depends on the units' target counts only,
    so SW and DTI get the same batches of targets."""
    n_targets = data.ref_targets(units)
    pool = 32 * max(1, round(batch_targets * len(units) / n_targets.sum()))
    order = rng.permutation(len(units))
    out = []
    for s in range(0, len(order), pool):
        batch, count = [], 0
        chunk = order[s:s + pool]
        for i in chunk[np.argsort(n_targets[chunk], kind='stable')].tolist():
            batch.append(i)
            count += n_targets[i]
            if count >= batch_targets:
                out.append(np.array(batch))
                batch, count = [], 0
        if batch:
            out.append(np.array(batch))
    return [out[i] for i in rng.permutation(len(out))]


# -----------------------------------------------------------------------------
# training

Step = namedtuple('Step', 'seconds targets loss padding')  # one optimizer step's record
ATTENTION_PATHS = ['sparse', 'dense']  # the exact paths --attn auto times (and flex on CUDA)


def model_config(args):
    return GPTConfig(vocab_size=data.VOCAB_SIZE, yes_id=data.YES_ID, no_id=data.NO_ID, n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, n=args.n, mask=args.mask, pos=args.pos,
                     block_size=args.block_size, dropout=args.dropout,
                     attn='sparse' if args.attn == 'auto' else args.attn)  # auto: train() times both


def build_model(args):
    return GPT(model_config(args)).to(args.device)


def learning_rate(step, total_steps, lr):
    """nanoGPT's schedule: linear warm-up over the first 10% of steps, then cosine decay to lr/10."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')


def fastest_attention(model, ds, units, mode, plan, args, steps=2, repeats=3):
    """--attn auto: forward + backward of the plan's first `steps` batches on every exact path,
    interleaved, `repeats` times; the path with the smaller median. Gradients are cleared after."""
    cuda = torch.device(args.device).type == 'cuda'
    times = {attn: [] for attn in ATTENTION_PATHS + (['flex'] if cuda and not args.dropout else [])}
    first = [to_device(data.collate_refs(ds, unit_prompts(units[batch], mode, args.n)), args.device)
             for _, _, batch in plan[:steps]]  # collated once, timed 2 x repeats times
    for _ in range(repeats):
        for attn in times:  # flex's first call compiles it: the median of the repeats leaves that out
            model.config.attn = attn
            t0 = time.perf_counter()
            for b in first:
                with autocast(args.device):
                    ctr_loss(model(b['idx'], b['block'], b['role']), b['label']).backward()
            if cuda:
                torch.cuda.synchronize()
            times[attn].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    best = [min(times, key=lambda attn: np.median(times[attn]))]
    if WORLD > 1:
        dist.broadcast_object_list(best, src=0)  # every rank takes rank 0's choice
    return best[0]


def train(model, ds, units, mode, args, desc='train', ckpt_dir=None, resume=None):
    """AdamW on BCE at target [SUM]s over `units` (train_units) of `ds`, SW prompts or DTI streams
    by `mode`; each batch's tensors and attention plan are built when its step comes (step_batch).
    Returns (targets trained, seconds spent, one Step per optimizer step); the clock covers
    collation, the plan, forward, backward and the update (on CUDA, over windows of 10 steps).
    With --attn auto, model.config.attn is first set to the fastest exact path.
    The batches of every epoch are drawn up front from args.seed, so a run is a fixed list of steps:
    with ckpt_dir, DIR/ckpt.pt is written every args.ckpt_every steps and at the end, and `resume`
    (a loaded checkpoint) continues at its step. Under torchrun every rank takes its share of each
    batch's prompts and DistributedDataParallel sums the gradients."""
    rng = np.random.default_rng(args.seed)
    opt = model.configure_optimizers(args.weight_decay, args.lr)
    per_epoch = int(data.ref_targets(units).sum())
    plan = [(e, i, batch) for e in range(args.epochs)
            for i, batch in enumerate(batches(units, args.batch_size, rng))]  # (epoch, step in epoch, batch)
    start, seen, seconds, records = 0, 0, 0.0, []
    if resume is not None:
        start, seen, seconds, records = restore(resume, model, opt, len(plan))
    if args.attn == 'auto':  # forward and backward only: the weights and the optimizer stay as they are
        model.config.attn = fastest_attention(model, ds, units, mode, plan, args)
    net = torch.compile(model, dynamic=True) if getattr(args, 'compile', False) else model
    if WORLD > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    model.train()
    bar = tqdm(total=args.epochs * per_epoch, initial=seen, unit='target', desc=desc, dynamic_ncols=True,
               disable=True if RANK else None)
    cuda = torch.device(args.device).type == 'cuda'
    read_every = 10 if cuda else 1  # reading a loss waits for the device: on CUDA once every 10 steps
    host = ThreadPoolExecutor(1) if cuda else None  # on CUDA the next batch is built while this one runs
    batch_of = lambda step: step_batch(ds, units[plan[step][2]], mode, model, args)
    ahead = host.submit(batch_of, start) if host and start < len(plan) else None
    window = []  # the steps since the losses were last read: [epoch, targets, padding, loss]
    for step in range(start, len(plan)):
        if not window:
            t0 = time.perf_counter()
        for group in opt.param_groups:
            group['lr'] = learning_rate(step, len(plan), args.lr)
        if host:
            b, attention, n_targets, share, padding = ahead.result()
            ahead = host.submit(batch_of, step + 1) if step + 1 < len(plan) else None
        else:
            b, attention, n_targets, share, padding = batch_of(step)
        with autocast(args.device):
            loss = ctr_loss(net(b['idx'], b['block'], b['role'], attention), b['label']) * share * WORLD  # DDP averages
        step_loss = loss.detach().float() / WORLD
        if WORLD > 1:
            dist.all_reduce(step_loss)  # the batch's mean loss, the same number on every rank
        window.append([plan[step][0], n_targets, padding, step_loss])
        if read_every == 1:  # read before the update: a non-finite loss stops the run before it spoils the weights
            read_losses(window, step, ckpt_dir)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        save = ckpt_dir and (step + 1 == len(plan) or args.ckpt_every and (step + 1) % args.ckpt_every == 0)
        if len(window) == read_every or save or step + 1 == len(plan):
            read_losses(window, step, ckpt_dir)  # on CUDA the one wait for the device in 10 steps
            window_seconds, window_targets = time.perf_counter() - t0, sum(w[1] for w in window)
            records += [Step(window_seconds * t / window_targets, t, loss, padding) for _, t, padding, loss in window]
            seen, seconds = seen + window_targets, seconds + window_seconds
            bar.set_postfix(epoch=plan[step][0] + 1, loss=f'{records[-1].loss:.4f}',
                            targets_per_s=f'{seen / seconds:.0f}', refresh=False)
            bar.update(window_targets)
            window = []
        if save:
            save_checkpoint(ckpt_dir, model, opt, step + 1, plan[step][:2], seen, seconds, records, args)
    bar.close()
    if host:
        host.shutdown()
    return seen, seconds, records


def step_batch(ds, units, mode, model, args):
    """What one step needs, built on the host from the CPU batch of `units`: this rank's share of
    the batch's prompts collated, and its attention plan (model.attention_plan), both on the
    device; the batch's number of targets, this rank's share of them, and the share of padding.
    On CUDA and under --compile token lengths are padded to a multiple of 128, so that few
    shapes occur."""
    batch = unit_prompts(units, mode, args.n)                                  # (prompts, 3) references
    mine = batch[RANK::WORLD]                                                  # this rank's share only
    bucket = 128 if torch.device(args.device).type == 'cuda' or getattr(args, 'compile', False) else 1
    b = data.collate_refs(ds, mine if len(mine) else batch[:1], multiple=bucket)
    if bucket > 1 and len(b['idx']) == 1:  # one prompt: torch.compile treats B=1 as a shape of its own,
        b = {key: torch.cat([v, torch.full_like(v, data.FILL[key])]) for key, v in b.items()}  # so add a PAD row
    n_targets = int(data.ref_targets(batch).sum())
    share = int((b['label'] >= 0).sum()) / n_targets if len(mine) else 0.0  # a rank without prompts adds 0
    padding = float((b['role'] == data.PAD).float().mean())
    on_device = to_device(b, args.device)
    where = on_device if model.config.attn == 'flex' else b  # a BlockMask's mask_mod reads block and role on the device
    attention = to_device(model.attention_plan(where['block'], where['role']), args.device)
    return on_device, attention, n_targets, share, padding


def read_losses(window, step, ckpt_dir):
    """The window's step losses as floats, read from the device at once; the first non-finite one
    stops the run (exit 1) naming its step and the last good checkpoint. `step` is the window's last."""
    if torch.is_tensor(window[-1][3]):
        for w, loss in zip(window, torch.stack([w[3] for w in window]).tolist()):
            w[3] = loss
    for i, (epoch, _, _, loss) in enumerate(window):
        if not math.isfinite(loss):
            last = os.path.join(ckpt_dir or '', 'ckpt.pt')
            kept = (f'the last good checkpoint is {last}' if ckpt_dir and os.path.exists(last)
                    else 'no checkpoint was written')
            die(f'the loss is {loss} at step {step + 2 - len(window) + i} (epoch {epoch + 1}); stopped, {kept}', code=1)


def restore(ckpt, model, opt, n_steps):
    """Load a checkpoint's weights, optimizer and RNG states into this run; returns (step, targets
    seen, seconds, records). A checkpoint that does not fit is one line, exit 2."""
    try:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
        for p in model.parameters():  # a foreign optimizer state may load, then fail at its first step
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise ValueError(f'an optimizer state of shape {tuple(v.shape)} '
                                     f'for a parameter of {tuple(p.shape)}')
        records = [Step(*r) for r in ckpt['records']]
        if not 0 < ckpt['step'] <= n_steps or len(records) != ckpt['step']:
            raise ValueError(f"step {ckpt['step']} with {len(records)} step records, in a run of {n_steps} steps")
        set_rng_states(ckpt['rng'])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        die(f"{ckpt['path']}: does not fit this run ({' '.join(str(e).split())[:300]})")
    return ckpt['step'], ckpt['seen'], ckpt['seconds'], records


def median_ms_per_target(records):
    """Median over steps of step time per target, warm-up (the first 5% of steps, at least 3) left out."""
    steady = records[max(3, len(records) // 20):] or records
    return 1000 * float(np.median([r.seconds / r.targets for r in steady]))


def flops_per_target(ds, refs, config, most=50_000):
    """Analytic training FLOPs per target of the prompts `refs` under a model config
    (model.training_flops: projections, MLP, attention over the query-key pairs the mask allows,
    read-out; real tokens only). Beyond `most` prompts, the mean over `most` evenly spaced ones."""
    if len(refs) > most:
        refs = refs[np.linspace(0, len(refs) - 1, most).astype(np.int64)]
    order = np.argsort(data.ref_tokens(ds, refs), kind='stable')
    total = 0
    for s in range(0, len(order), 64):
        b = data.collate_refs(ds, refs[order[s:s + 64]])
        total += training_flops(config, b['block'], b['role'])
    return total / int(data.ref_targets(refs).sum())

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model, ds, refs, device=None, max_tokens=32768):
    """Logits of every target of the prompts `refs`, in prompt order and position order inside a
    prompt. Under torchrun each rank scores every WORLD-th prompt and all ranks gather all logits."""
    device = device or next(model.parameters()).device
    model.eval()
    tokens = data.ref_tokens(ds, refs)
    mine = np.arange(RANK, len(refs), WORLD)
    order = mine[np.argsort(tokens[mine], kind='stable')].tolist()  # similar lengths together
    out = [None] * len(refs)
    i = 0
    bar = tqdm(total=len(order), unit='prompt', desc='eval', leave=False, dynamic_ncols=True,
               disable=True if RANK else None)
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * tokens[order[j]] <= max_tokens:
            j += 1
        b = {key: v.to(device) for key, v in data.collate_refs(ds, refs[order[i:j]]).items()}
        with autocast(device):
            logits = model(b['idx'], b['block'], b['role']).float().cpu()      # (B, T)
        for o, row, lab in zip(order[i:j], logits, b['label'].cpu()):
            out[o] = row[lab >= 0].numpy()
        bar.update(j - i)
        i = j
    bar.close()
    model.train()
    if WORLD > 1:
        parts = [None] * WORLD
        dist.all_gather_object(parts, [(o, out[o]) for o in mine])
        for part in parts:
            for o, logits in part:
                out[o] = logits
    return np.concatenate(out) if out else np.zeros(0)


def auc(labels, scores):
    """ROC AUC, or None when the labels are all one class (it is undefined then)."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def metrics(logits, labels):
    p = 1.0 / (1.0 + np.exp(-logits))
    return dict(auc=auc(labels, p), logloss=float(log_loss(labels, p, labels=[0, 1])),
                f1=float(f1_score(labels, p > 0.5, zero_division=0.0)), acc=float(accuracy_score(labels, p > 0.5)))


def warn(msg):
    if not RANK:
        print(f'dti_minimal.py: warning: {msg}', file=sys.stderr)


def target_labels(ds, refs):
    return data.ref_labels(ds, refs)


BASELINE = "logistic regression on the item's and the window's positive rates"


def baseline(ds, n, most=1_000_000):
    """A non-neural reference: logistic regression on two rates a reader can count by hand, the
    target item's positive rate in train (leave-one-out on train targets, smoothed towards the
    overall rate) and the positive rate of the target's n-block window. Fit on the train targets
    (beyond `most` of them, on `most` evenly spaced ones); returns its metrics on the test targets."""
    y, split = ds['label'], ds['split']
    train = split == 0
    _, items = np.unique(ds['item'], return_inverse=True)                    # ids -> 0 .. n_items-1
    pos = np.bincount(items[train], weights=y[train], minlength=items.max() + 1)    # (n_items,)
    count = np.bincount(items[train], minlength=items.max() + 1)                    # (n_items,)
    overall = pos.sum() / count.sum()
    liked = np.r_[0, np.cumsum(y, dtype=np.int64)]           # liked[t]: likes among blocks 0 .. t-1

    def features(t):                                         # t: targets, n predecessors in their user
        own = split[t] == 0                                  # a train target leaves its own label out
        item_rate = (pos[items[t]] - own * y[t] + 10 * overall) / (count[items[t]] - own + 10)
        return np.stack([item_rate, (liked[t] - liked[t - n]) / n], 1)      # t-n is still t's user
    target = data.positions(ds) >= n
    fit, test = np.flatnonzero(target & train), np.flatnonzero(target & (split == 2))
    if len(fit) > most:
        fit = fit[np.linspace(0, len(fit) - 1, most).astype(np.int64)]
    model = LogisticRegression().fit(features(fit), y[fit])
    return metrics(model.decision_function(features(test)), y[test])

# -----------------------------------------------------------------------------
# experiments: one run (--mode sw, dti), SW against DTI (compare), the ablation, attention paths (bench)


def eval_prompts(args, ds, mode, k):
    """{'valid': (refs, prob), 'test': (refs, prob)}: SW prompts or streams of k targets, of the
    first --max-eval-targets targets of each split if given."""
    return {name: make_prompts(ds, split, mode, args.n, k, args.max_eval_targets)
            for split, name in ((1, 'valid'), (2, 'test'))}


def prepare(args, ds, mode, k, evals=None):
    """Train units (train_units) and valid/test prompts (`evals`, built here from --eval-mode
    unless given) for one run, or a one-line error before any work."""
    units = train_units(ds, args.n, k, args.max_train_targets)
    evals = evals or eval_prompts(args, ds, args.eval_mode, k)
    if not len(units) or not all(len(refs) for refs, _ in evals.values()):
        die(f'{ds["name"]} has no train, valid or test targets with n={args.n} predecessors')
    if args.epochs * len(units) > MAX_PLANNED_UNITS:
        die(f'--epochs {args.epochs} over {len(units)} streams plans {args.epochs * len(units)} stream draws '
            f'before step 1, more than {MAX_PLANNED_UNITS}')
    labels = np.unique(target_labels(ds, units))
    if len(labels) < 2:
        die(f'{ds["name"]}: the train targets are all {"positive" if labels[0] else "negative"}; nothing to learn')
    longest = max(int(data.ref_tokens(ds, refs).max()) for refs in [unit_prompts(units, mode, args.n)]
                  + [refs for refs, _ in evals.values()])
    if args.pos == 'learned' and longest > args.block_size:
        die(f'a prompt of {longest} tokens is longer than --block-size {args.block_size} (learned positions)')
    return units, evals


def run(args, ds, mode, k, prepared, init=None, ckpt_dir=None, resume=None):
    """Train one model (from the state `init` if given; checkpoints into ckpt_dir; continuing the
    checkpoint `resume`), evaluate it, return its results."""
    units, evals = prepared
    train_prompts = unit_prompts(units, mode, args.n)
    torch.manual_seed(args.seed)
    model = build_model(args)
    if init is not None:  # an ALiBi model takes a learned-position model's weights but its wpe
        model.load_state_dict({key: v for key, v in init.items() if args.pos == 'learned' or 'wpe' not in key})
    print(f'{ds["name"]}: {len(train_prompts)} {mode} prompts, {data.ref_targets(units).sum()} train targets, '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    targets_trained, train_seconds, records = train(model, ds, units, mode, args, f'train {mode}', ckpt_dir, resume)
    res = dict(mode=mode, dataset=args.dataset, n=args.n, k=k, mask=args.mask, pos=args.pos, attn=model.config.attn,
               n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, seed=args.seed,
               targets_trained=targets_trained, train_seconds=train_seconds, steps=len(records),
               mean_targets_per_step=targets_trained / len(records),
               time_per_target_ms=1000 * train_seconds / targets_trained,
               median_time_per_target_ms=median_ms_per_target(records),
               flops_per_target=flops_per_target(ds, train_prompts, model.config),
               padding=float(np.mean([r.padding for r in records])),
               first_loss=float(np.mean([r.loss for r in records[:10]])),
               last_loss=float(np.mean([r.loss for r in records[-10:]])),
               step_loss=[r.loss for r in records])
    for name, (refs, prob) in evals.items():
        labels = target_labels(ds, refs)
        res[f'{name}_targets'] = len(labels)
        res.update({f'{name}_{key}': v for key, v in metrics(predict(model, ds, refs, args.device), labels).items()})
        res[f'{name}_bayes_auc'] = auc(labels, prob) if np.isfinite(prob).all() else None
    res['bayes_auc'] = res.get('test_bayes_auc')  # None on real data: nobody knows the true probabilities
    res['args'] = vars(args)
    return res, model


def train_and_report(args, ckpt):
    """--mode sw or dti: load and prepare the data, train with checkpoints in DIR, evaluate, write
    results.json (with the preparation time and the process's peak memory), print the table."""
    t0 = time.perf_counter()
    ds = load_dataset(args)
    prepared = prepare(args, ds, args.mode, args.k)
    prepare_seconds, prepare_peak_rss_mb = time.perf_counter() - t0, peak_rss_mb()
    print(f'data prepared in {prepare_seconds:.1f}s, peak memory so far {prepare_peak_rss_mb:.0f} MB')
    res, _ = run(args, ds, args.mode, args.k, prepared, ckpt_dir=args.out, resume=ckpt)
    res.update({f'baseline_test_{key}': v for key, v in baseline(ds, args.n).items()})
    res.update(prepare_seconds=prepare_seconds, prepare_peak_rss_mb=prepare_peak_rss_mb, peak_rss_mb=peak_rss_mb())
    path = write_json(args.out, 'results.json', res)
    print()
    print_table(['', 'AUC', 'LogLoss', 'F1', 'Acc', 'Bayes AUC'],
                [[name, *(num(res[f'{key}_{m}']) for m in ('auc', 'logloss', 'f1', 'acc')),
                  num(res.get(f'{key}_bayes_auc'))]
                 for name, key in (('valid', 'valid'), ('test', 'test'), ('test LR', 'baseline_test'))])
    print(f'test LR: the non-neural baseline, {BASELINE}')
    print(f"{args.mode}: {res['targets_trained']} targets in {res['train_seconds']:.1f}s, "
          f"{res['time_per_target_ms']:.3f} ms per target, {res['flops_per_target'] / 1e6:.2f} MFLOP per target "
          f"(analytic); wrote {path}")
    return res


def compare(args, ds):
    """SW and DTI step for step: the same initial weights, data, mask and steps, SW step j on the
    targets of DTI step j (train_units). One SW run, one DTI run per k; speed-ups are ratios of
    median step times per target in this process, each run on its faster path under --attn auto."""
    evals = eval_prompts(args, ds, 'sw', args.k[0]) if args.eval_mode == 'sw' else None  # the same for every k
    prepared = {k: prepare(args, ds, 'dti', k, evals) for k in args.k}
    sw_prepared = prepare(args, ds, 'sw', args.k[0], evals)
    torch.manual_seed(args.seed)
    init = build_model(args).state_dict()
    sw, _ = run(args, ds, 'sw', args.k[0], sw_prepared, init)
    sw.update({f'baseline_test_{key}': v for key, v in baseline(ds, args.n).items()})  # once per data set
    sweep = []
    for k in args.k:
        dti, _ = run(args, ds, 'dti', k, prepared[k], init)
        assert dti['targets_trained'] == sw['targets_trained']
        sweep.append(dict(k=k, dti_time_per_target_ms=dti['median_time_per_target_ms'],
                          speedup=sw['median_time_per_target_ms'] / dti['median_time_per_target_ms'],
                          analytic_speedup=sw['flops_per_target'] / dti['flops_per_target'],
                          ideal_ratio=args.n * k / (args.n + k), dti_flops_per_target=dti['flops_per_target'],
                          dti_test_auc=dti['test_auc'], dti_test_logloss=dti['test_logloss'],
                          dti_test_f1=dti['test_f1'], dti_train_seconds=dti['train_seconds'], dti_padding=dti['padding'],
                          dti_attn=dti['attn'], dti_steps=dti['steps'], dti_step_loss=dti['step_loss']))
    first = sweep[0]
    res = dict(first, sw_time_per_target_ms=sw['median_time_per_target_ms'], sw_test_auc=sw['test_auc'],
               sw_test_logloss=sw['test_logloss'], sw_test_f1=sw['test_f1'], sw_flops_per_target=sw['flops_per_target'],
               sw_train_seconds=sw['train_seconds'], sw_padding=sw['padding'], sw_attn=sw['attn'], sw_steps=sw['steps'],
               sw_step_loss=sw['step_loss'], max_step_loss_diff=step_loss_diff(sw['step_loss'], first['dti_step_loss']),
               mean_targets_per_step=sw['mean_targets_per_step'], bayes_auc=sw['bayes_auc'],
               **{key: sw[key] for key in ('baseline_test_auc', 'baseline_test_logloss', 'baseline_test_f1')},
               n=args.n, mask=args.mask, pos=args.pos, targets_trained=sw['targets_trained'],
               torch=torch.__version__, threads=torch.get_num_threads(), sweep=sweep, args=vars(args))
    path = write_json(args.out, 'compare.json', res)
    print(f"\nSW vs DTI, n={args.n}, mask={args.mask}, pos={args.pos}, {sw['targets_trained']} targets trained each "
          f"in {sw['steps']} paired steps of {sw['mean_targets_per_step']:.0f} targets on average; "
          f"medians of step time per target")
    print_table(['', 'path', 'ms/target', 'speed-up', 'analytic', 'n*k/(n+k)', 'test AUC', 'padding'],
                [['SW', sw['attn'], f"{sw['median_time_per_target_ms']:.3f}", '1.0x', '1.0x', '',
                  num(sw['test_auc']), f"{sw['padding']:.1%}"]] +
                [[f"DTI k={r['k']}", r['dti_attn'], f"{r['dti_time_per_target_ms']:.3f}", f"{r['speedup']:.1f}x",
                  f"{r['analytic_speedup']:.1f}x", f"{r['ideal_ratio']:.1f}x", num(r['dti_test_auc']),
                  f"{r['dti_padding']:.1%}"] for r in sweep])
    print()
    print_table(['', 'test AUC', 'LogLoss', 'F1', 'train s'],
                [['SW', *(num(sw[f'test_{m}']) for m in ('auc', 'logloss', 'f1')), f"{sw['train_seconds']:.1f}"]] +
                [[f"DTI k={r['k']}", *(num(r[f'dti_test_{m}']) for m in ('auc', 'logloss', 'f1')),
                  f"{r['dti_train_seconds']:.1f}"] for r in sweep] +
                [['test LR', *(num(sw[f'baseline_test_{m}']) for m in ('auc', 'logloss', 'f1')), '']])
    print(f'test LR: {BASELINE}')
    print(f"largest difference of SW's and DTI k={first['k']}'s loss at the same step: {res['max_step_loss_diff']:.2e}")
    print(f'wrote {path}')
    return res


def step_loss_diff(a, b):
    """Largest |difference| of two runs' losses at the same step (they take the same steps)."""
    assert len(a) == len(b), (len(a), len(b))
    return float(np.max(np.abs(np.subtract(a, b))))


ABLATION = [  # (name, mode, mask, pos): pos None is --pos
    ('SW, standard', 'sw', 'window', None),
    ('SW, isolated', 'sw', 'isolated', None),
    ('DTI, naive', 'dti', 'window', 'learned'),
    ('DTI, ALiBi only', 'dti', 'window', 'alibi'),
    ('DTI, isolation only', 'dti', 'isolated', 'learned'),
    ('DTI, both', 'dti', 'isolated', 'alibi'),
]


def ablation(args, ds):
    """The paper's ablation on this code: SW with the standard (causal) and the isolated mask, and
    DTI with {window, isolated} x {learned, ALiBi} for every k of --k, all from the same initial
    weights on the same targets and steps. Every model is scored twice: on SW prompts (how a
    deployed model meets one new target) and on streams of its k (SW rows: the largest k)."""
    evals = {f'{split}_sw': prompts for split, prompts in eval_prompts(args, ds, 'sw', args.k[0]).items()}
    streams = {k: {f'{split}_stream': prompts for split, prompts in eval_prompts(args, ds, 'dti', k).items()}
               for k in args.k}
    runs = [(name, mode, mask, pos or args.pos, k) for name, mode, mask, pos in ABLATION
            for k in ([max(args.k)] if mode == 'sw' else args.k)]
    torch.manual_seed(args.seed)
    init = build_model(argparse.Namespace(**{**vars(args), 'pos': 'learned'})).state_dict()
    rows = []
    for name, mode, mask, pos, k in runs:
        row_args = argparse.Namespace(**{**vars(args), 'mask': mask, 'pos': pos, 'k': k})
        print(f'\n{name}: --mode {mode} --mask {mask} --pos {pos}' + (f' --k {k}' if mode == 'dti' else ''))
        res, _ = run(row_args, ds, mode, k, prepare(row_args, ds, mode, k, {**evals, **streams[k]}), init)
        row = dict(name=name, mode=mode, mask=mask, pos=pos, k=k if mode == 'dti' else None, attn=res['attn'],
                   train_seconds=res['train_seconds'], median_time_per_target_ms=res['median_time_per_target_ms'],
                   flops_per_target=res['flops_per_target'], targets_trained=res['targets_trained'],
                   steps=res['steps'], step_loss=res['step_loss'])
        for split in ('valid', 'test'):
            for way in ('sw', 'stream'):
                row.update({f'{split}_{m}_{way}': res[f'{split}_{way}_{m}'] for m in ('auc', 'logloss')})
        rows.append(row)
    standard, isolated = rows[:2]
    for row in rows:
        row['speedup'] = standard['median_time_per_target_ms'] / row['median_time_per_target_ms']
    # SW rows train on the batches of streams of the largest k: a DTI row at that k takes the same steps on the
    # same targets as the SW row with its mask, and from the same weights its first step's loss differs only by
    # what the two paradigms compute differently ('DTI, both' against 'SW, isolated': nothing but round-off)
    paired = [r for r in rows if r['k'] == max(args.k)]
    for r in paired:
        sw_row = isolated if r['mask'] == 'isolated' else standard
        diff = np.abs(np.subtract(r['step_loss'], sw_row['step_loss']))
        r.update(paired_sw_row=sw_row['name'], step_loss_diff_first=float(diff[0]), step_loss_diff_max=float(diff.max()),
                 first_step_diff_over_1e4=int(np.argmax(diff > 1e-4)) + 1 if (diff > 1e-4).any() else None)
    both = next(r for r in paired if r['name'] == 'DTI, both')
    test_prompts, test_prob = evals['test_sw']
    res = dict(dataset=args.dataset, n=args.n, k=args.k, targets_trained=standard['targets_trained'],
               steps=standard['steps'], bayes_auc=auc(target_labels(ds, test_prompts), test_prob)
               if np.isfinite(test_prob).all() else None,
               max_step_loss_diff=both['step_loss_diff_max'],
               torch=torch.__version__, threads=torch.get_num_threads(), rows=rows, args=vars(args))
    path = write_json(args.out, 'ablation.json', res)
    bayes = '' if res['bayes_auc'] is None else f", Bayes AUC {res['bayes_auc']:.4f}"
    print(f"\nablation on {args.dataset}, n={args.n}, {res['targets_trained']} targets trained by every row{bayes}; "
          f"test metrics scored on SW prompts and on streams of the row's k (SW rows: k={max(args.k)})")
    print_table(['', 'k', 'mask', 'pos', 'path', 'AUC SW', 'LogLoss SW', 'AUC stream', 'LogLoss stream',
                 'train s', 'ms/target', 'speed-up'],
                [[r['name'], str(r['k'] or ''), r['mask'], r['pos'], r['attn'], num(r['test_auc_sw']),
                  num(r['test_logloss_sw']), num(r['test_auc_stream']), num(r['test_logloss_stream']),
                  f"{r['train_seconds']:.1f}", f"{r['median_time_per_target_ms']:.3f}", f"{r['speedup']:.1f}x"]
                 for r in rows])
    print(f"\nat k={max(args.k)} every DTI row takes the same steps as the SW row with its mask, from the same weights; "
          f"their losses at the same step differ by")
    print_table(['', 'against', 'step 1', 'first step > 1e-4', 'largest'],
                [[r['name'], r['paired_sw_row'], f"{r['step_loss_diff_first']:.1e}",
                  str(r['first_step_diff_over_1e4'] or '-'), f"{r['step_loss_diff_max']:.1e}"] for r in paired])
    print(f'valid metrics and step losses are in {path}')
    return res


def bench_stream(args, targets=440):
    """One DTI stream of n context blocks and 440 targets: about 4,000 tokens."""
    ds = data.synthetic(n_users=1, min_len=args.n + targets, max_len=args.n + targets, n=args.n)
    return data.collate_refs(ds, data.dti_refs(np.array([[0, args.n + targets]]), args.n, targets))


def peak_rss_mb():
    """The most memory (resident set, MB) this process has held so far."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 2**10)


def step_peak_mb(step):
    """Peak resident memory (MB) that `step()` adds above what the process held before it
    (Linux: resets the high-water mark through /proc/self/clear_refs; None elsewhere)."""
    def status(key):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return None
    before = status('VmRSS:')
    step()
    return status('VmHWM:') - before


def bench(args):
    """Block-sparse vs dense attention (and FlexAttention on CUDA), forward + backward on one long
    stream, interleaved; on CUDA each timing waits for the device."""
    b = to_device(bench_stream(args), args.device)
    cuda = torch.device(args.device).type == 'cuda'
    times = {attn: [] for attn in ['sparse', 'dense'] + (['flex'] if cuda else [])}
    models = {attn: build_model(argparse.Namespace(**{**vars(args), 'attn': attn})) for attn in times}

    def step(model):
        with autocast(args.device):
            model(b['idx'], b['block'], b['role']).float().sum().backward()
        if cuda:
            torch.cuda.synchronize()
    for _ in tqdm(range(6), desc='bench', leave=False, disable=None):
        for attn, model in models.items():
            t0 = time.perf_counter()
            step(model)
            times[attn].append(time.perf_counter() - t0)
    ms = {attn: 1000 * float(np.median(t[1:])) for attn, t in times.items()}  # the first is warm-up
    peak = {attn: step_peak_mb(lambda: step(model)) for attn, model in models.items()}
    res = dict(tokens=b['idx'].size(1), n=args.n, mask=args.mask, pos=args.pos, device=str(args.device),
               **{f'{attn}_ms': ms[attn] for attn in times}, speedup=ms['dense'] / ms['sparse'],
               **{f'{attn}_peak_mb': peak[attn] for attn in times}, torch=torch.__version__,
               threads=torch.get_num_threads())
    path = write_json(args.out, 'bench.json', res)
    print(f"one stream of {res['tokens']} tokens, n={args.n}, mask={args.mask}, forward + backward (median of 5)")
    for attn in times:
        print(f"{attn:>7} {ms[attn]:9.1f} ms   peak host memory of a step {peak[attn] or float('nan'):7.0f} MB")
    print(f"sparse is {res['speedup']:.1f}x faster than dense; wrote {path}")
    return res

# -----------------------------------------------------------------------------
# plumbing: checkpoints, distributed runs, output

CKPT_FORMAT = 'dti-minimal checkpoint v1'
CKPT_KEYS = dict(model=dict, optimizer=dict, step=int, epoch=int, batch_in_epoch=int, seen=int, seconds=float,
                 records=list, rng=dict, args=dict)  # what save_checkpoint writes, and its types
SHAPE_ARGS = ['n_layer', 'n_head', 'n_embd', 'pos', 'block_size']  # a checkpoint's weights fit these only
RUN_ARGS = ['mode', 'dataset', 'users', 'history', 'n', 'k', 'mask', 'dropout', 'epochs', 'max_train_targets',
            'batch_size', 'lr', 'weight_decay', 'seed']  # what a resumed run must keep to be the same run


def rng_states():
    np_state = np.random.get_state(legacy=False)
    np_state['state']['key'] = torch.from_numpy(np_state['state']['key'].astype(np.int64))  # tensors load safely
    return dict(python=random.getstate(), numpy=np_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states):
    random.setstate(states['python'])
    np_state = states['numpy']
    np.random.set_state({**np_state, 'state': {**np_state['state'], 'key': np_state['state']['key'].numpy().astype(np.uint32)}})
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def save_checkpoint(folder, model, opt, step, where, seen, seconds, records, args):
    """DIR/ckpt.pt, atomically: a temporary file, then os.replace. Rank 0 only. Step records are
    stored as plain tuples, which torch.load(weights_only=True) reads back."""
    if RANK:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'ckpt.pt')
    torch.save(dict(format=CKPT_FORMAT, model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                    epoch=where[0], batch_in_epoch=where[1], seen=seen, seconds=seconds,
                    records=[tuple(r) for r in records], rng=rng_states(), args=vars(args)), path + '.tmp')
    os.replace(path + '.tmp', path)


def load_checkpoint(args):
    """DIR/ckpt.pt for --resume, checked against this run's arguments; any problem is one line."""
    path = os.path.join(args.out, 'ckpt.pt')
    if not os.path.isfile(path):
        die(f'--resume: no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)  # tensors and plain types only
    except Exception as e:
        die(f'{path}: not a readable checkpoint ({type(e).__name__})')
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        die(f'{path}: not a dti-minimal checkpoint')
    for key, kind in CKPT_KEYS.items():
        if not isinstance(ckpt.get(key), kind):
            die(f'{path}: a damaged checkpoint ({key!r} is missing or not a {kind.__name__})')
    ckpt['path'] = path
    for key in SHAPE_ARGS + RUN_ARGS:
        old, new = ckpt['args'].get(key), getattr(args, key)
        if old != new:
            flag = '--' + key.replace('_', '-')
            die(f'--resume: {flag} {new} changes the model shape (the checkpoint has {old})' if key in SHAPE_ARGS else
                f'--resume: {flag} {new} differs from the checkpoint ({old}); a resumed run must be the same run')
    return ckpt


def setup_distributed(args):
    """Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK): join the process group, gloo on CPU,
    nccl on CUDA with one GPU per process. Only rank 0 prints and writes files."""
    global RANK, WORLD
    if 'RANK' not in os.environ:
        return
    if args.mode not in ('sw', 'dti'):
        die(f'torchrun runs --mode sw or dti, not {args.mode}')
    cuda = torch.device(args.device).type == 'cuda'
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group('nccl' if cuda else 'gloo')
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    if RANK:
        sys.stdout = open(os.devnull, 'w')


OUTPUTS = dict(sw=['results.json', 'ckpt.pt'], dti=['results.json', 'ckpt.pt'], compare=['compare.json'],
               ablation=['ablation.json'], bench=['bench.json'])  # what each mode writes into --out


def check_out(args):
    """--out is, or can be made, a folder we can write into: tried with a temporary folder in its
    deepest existing ancestor, removed again (nothing is left); no file the run will write, nor its
    temporary twin, exists there as something other than a file."""
    path = os.path.abspath(args.out)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    try:
        os.rmdir(tempfile.mkdtemp(dir=path, prefix='.dti-probe-'))
    except OSError:
        die(f'output folder {args.out} cannot be written')
    for name in OUTPUTS[args.mode]:
        for p in (os.path.join(args.out, name), os.path.join(args.out, name + '.tmp')):
            if os.path.lexists(p) and not os.path.isfile(p):
                die(f'{p} exists and is not a file; the run would write it')


def finite(obj):
    """obj with every non-finite float made None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(folder, name, obj):
    """Atomically: a temporary file, then os.replace. Rank 0 only. Strict JSON: NaN becomes null."""
    if RANK:
        return os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, name + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(finite(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, os.path.join(folder, name))
    return os.path.join(folder, name)


def num(v, spec='.4f'):
    """A table cell: the number, or '-' for None (an AUC on one class, a Bayes AUC on real data)."""
    return '-' if v is None else format(v, spec)


def print_table(header, rows):
    """Rows of cells (strings) under a header: the first column left-aligned (row names), the others
    right-aligned, each as wide as its widest cell."""
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    for r in [header] + rows:
        print('  '.join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(r, widths))))

# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    check_out(args)
    if args.resume and args.mode not in ('sw', 'dti'):
        die('--resume continues a --mode sw or dti run')
    ckpt = load_checkpoint(args) if args.resume else None
    setup_distributed(args)
    try:
        if args.mode == 'bench':
            return bench(args)
        if args.mode in ('compare', 'ablation'):
            return (compare if args.mode == 'compare' else ablation)(args, load_dataset(args))
        return train_and_report(args, ckpt)
    except KeyboardInterrupt:  # Ctrl-C: what is on disk, and how to go on from it
        path = os.path.join(args.out, 'ckpt.pt')
        for name in OUTPUTS[args.mode]:
            if os.path.isfile(os.path.join(args.out, name + '.tmp')) and not RANK:
                os.remove(os.path.join(args.out, name + '.tmp'))  # half-written
        die(f'interrupted; rerun with --resume to continue from {path}' if args.mode in ('sw', 'dti') and
            os.path.isfile(path) else 'interrupted; no checkpoint was written', code=130)
    finally:
        if WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
