"""
Train a from-scratch GPT for CTR prediction with sliding-window prompts (SW) or Dynamic Target
Isolation streams (DTI), evaluate it, and write DIR/results.json.

    python dti_minimal.py --mode dti        # n=20 context blocks, k=50 targets per stream
    python dti_minimal.py --mode sw         # the same model and data, one prompt per target
    python dti_minimal.py --mode compare    # both, from the same weights on the same steps: DIR/compare.json
    python dti_minimal.py --mode ablation   # masks x positions x k: DIR/ablation.json
    python dti_minimal.py --mode bench      # block-sparse vs dense attention: DIR/bench.json

Words used throughout:
    block     one interaction as tokens: its item text, [SUM] (where its logit is read), its label
    prompt    consecutive blocks of one user as a reference (first block, end block, first target):
              an SW prompt (n context blocks, then one target) or a DTI stream (n, then k targets)
    unit      the targets of one DTI stream; batches are drawn over units, so that SW and DTI
              take the same steps on the same targets
    plan      a batch's attention plan: who sees whom, worked out once for all layers
    schedule  the run's steps, (epoch, units of the batch), drawn up front from the seed

Top to bottom: flags, data, training, evaluation, main: all that --mode sw and dti compute.
Below the divider: experiments (compare, ablation, bench), measures, reports (seeds, intervals),
long runs (checkpoints, torchrun, CUDA), and plumbing (the checks no flag type covers, output).
`block_size` (nanoGPT's name) counts tokens; `label` is a block's 0/1 click, in a batch -1 where
no loss is taken.
"""
import os
import signal
import sys
import threading


def interrupted_while_importing(signum, frame):
    """Ctrl-C while torch imports: one line, exit 130. Raising KeyboardInterrupt here could cross
    torch's C++ initialisation and abort the process, so the process ends at once."""
    sys.stderr.write('dti_minimal.py: error: interrupted; nothing was written\n')
    sys.stderr.flush()
    os._exit(130)


CTRL_C = signal.getsignal(signal.SIGINT)  # restored once the imports are done
QUIET = CTRL_C is signal.default_int_handler and threading.current_thread() is threading.main_thread()
if QUIET:
    signal.signal(signal.SIGINT, interrupted_while_importing)
import argparse
import contextlib
import itertools
import json
import math
import tempfile
import time
import warnings
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from tqdm import tqdm

import data
from model import GPT, GPTConfig, Tiles, ctr_loss, training_flops
if QUIET:
    signal.signal(signal.SIGINT, CTRL_C)

DATASETS = ['synthetic', 'synthetic-future', 'synthetic-far', 'ml-100k', 'ml-1m', 'ml-20m', 'ml-25m']
PATH_RULE = dict(sw='dense', dti='sparse')  # each paradigm's attention path: the faster one for it on a CPU
RANK, WORLD = 0, 1  # this process's rank and the number of processes (torchrun sets them)

# -----------------------------------------------------------------------------
# flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = die  # one line, exit 2, also for argparse's own complaints
    add = p.add_argument
    # what to run
    add('--mode', choices=['sw', 'dti', 'compare', 'ablation', 'bench'], default='dti',
        help='paradigm; compare: SW and DTI step for step; ablation: masks x positions x k; bench: paths')
    add('--out', default='out', help='output folder for results.json (compare.json, ...) and ckpt.pt')
    add('--seeds', type=int, default=1, help='train every model once per seed --seed, --seed+1, ...')
    # data
    add('--dataset', choices=DATASETS, default='synthetic', help='synthetic-future and -far: leak canaries')
    add('--data-dir', help='MovieLens: a GroupLens folder or zip, or RecBole atomic files '
                           '(default: $DTI_DATA, ~/.cache/dti-minimal, else download there)')
    add('--users', type=int, default=600, help='number of synthetic users')
    add('--history', type=ints, default=(60, 120), metavar='MIN,MAX',
        help='interactions per synthetic user, drawn uniformly from MIN..MAX')
    add('--n', type=int, default=20, help='context blocks each target sees')
    add('--k', type=ints, dest='ks', help='targets per DTI stream (default 50); compare and ablation take a '
                                          'list such as 1,5,50 (ablation default: 5,50)')
    add('--max-train-targets', type=int, help='train on the first N targets only')
    add('--max-eval-targets', type=int, help='score valid and test on their first N targets only')
    # model
    add('--mask', choices=['isolated', 'window'], default='isolated',
        help="'isolated' (exact target isolation) or 'window' (windowed causal, leaks with depth)")
    add('--pos', choices=['alibi', 'learned'], default='alibi', help='ALiBi, or learned absolute positions')
    add('--n-layer', type=int, default=2, help='transformer layers')
    add('--n-head', type=int, default=4, help='attention heads')
    add('--n-embd', type=int, default=64, help='embedding width C')
    add('--block-size', type=int, default=2048, help='longest prompt in tokens (learned positions only)')
    add('--dropout', type=float, default=0.0, help='dropout rate')
    add('--attn', choices=['dense', 'sparse', 'flex'], help='attention path (default: dense for SW prompts, '
        'sparse for DTI streams; --mode bench times them); flex: FlexAttention, CUDA only')
    # training
    add('--epochs', type=int, default=4, help='passes over the training targets')
    add('--batch-size', type=int, default=256, help='targets a step: whole units up to at least this many '
                                                     '(the last batch of a pool may hold fewer)')
    add('--lr', type=float, default=3e-3, help='peak learning rate (AdamW; warm-up, then cosine decay)')
    add('--weight-decay', type=float, default=0.01, help='AdamW weight decay of matrices and embeddings')
    add('--seed', type=int, default=0, help='model init and batch order (the data is fixed)')
    add('--device', default='auto', help='auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps')
    add('--compile', action='store_true', help='torch.compile the model for training')
    add('--ckpt-every', type=int, default=200, help='write DIR/ckpt.pt every N steps (0: at the end only)')
    add('--resume', action='store_true', help='continue the run whose checkpoint is DIR/ckpt.pt')
    add('--eval-mode', choices=['sw', 'dti'], default='sw', help='score valid/test on SW prompts or streams')
    return check_args(p.parse_args(argv))  # what no type= checks (below, with the plumbing)


def ints(text):
    """'50' -> [50]; '1,5,50' -> [1, 5, 50]."""
    try:
        return [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'takes whole numbers separated by commas, got {text!r}')


# -----------------------------------------------------------------------------
# data


def load_dataset(args):
    """The data set, its statistics printed; bad or missing MovieLens files are a one-line error."""
    try:
        ds = data.movielens(args.dataset, args.data_dir) if args.dataset.startswith('ml-') else \
            data.synthetic(args.users, min_len=args.history[0], max_len=args.history[1], n=args.n,
                           canary=args.dataset.partition('-')[2] or None)
    except data.DataError as e:
        die(str(e))
    print(data.describe(ds, args.n))
    return ds


def split_prompts(ds, split, mode, n, k, max_targets=None):
    """The SW prompts or DTI streams whose targets are the interactions of `split` (the first
    max_targets of them, if given), and the targets' true click probabilities in order."""
    runs, prob = data.segments(ds, split, n)
    if max_targets is not None:
        targets = runs[:, 1] - runs[:, 0] - n
        before = np.cumsum(targets) - targets                                  # targets in earlier runs
        runs, before = runs[before < max_targets], before[before < max_targets]
        runs[:, 1] = np.minimum(runs[:, 1], runs[:, 0] + n + max_targets - before)
        prob = prob[:max_targets]
    return (data.sw_prompts(runs, n) if mode == 'sw' else data.dti_streams(runs, n, k)), prob


def unit_prompts(units, mode, n):
    """The prompts a batch of units trains on: the streams themselves (DTI), or one SW prompt per
    target of theirs, in the same target order (SW)."""
    return units if mode == 'dti' else data.sw_prompts(np.stack([units[:, 2] - n, units[:, 1]], axis=1), n)


def batches(units, batch_targets, rng):
    """Shuffled batches (arrays of unit indices) of whole units holding at least batch_targets
    targets, or what is left at the end of a pool. Units with as many targets go together (sorted
    inside shuffled pools of ~32 batches), so little is padding. The draw depends on the units'
    target counts only, so SW and DTI get the same batches of targets."""
    n_targets = data.prompt_targets(units)
    pool = 32 * max(1, round(batch_targets * len(units) / n_targets.sum()))
    order, out = rng.permutation(len(units)), []
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


def eval_prompts(args, ds, mode, k):
    """{'valid': (prompts, prob), 'test': ...}, of the first --max-eval-targets of each split if given."""
    return {name: split_prompts(ds, split, mode, args.n, k, args.max_eval_targets)
            for split, name in ((1, 'valid'), (2, 'test'))}


def prepare(args, ds, mode, k, evals, pos=None):
    """(train units, evals) of one run (whose positions are `pos`, by default --pos), or a one-line
    error before any work. The units are the train targets as streams of k; an SW step trains on
    the SW prompts of its batch's units."""
    units = split_prompts(ds, 0, 'dti', args.n, k, args.max_train_targets)[0]
    check_prompts(args, ds, mode, units, evals, pos)
    return units, evals

# -----------------------------------------------------------------------------
# training

Step = namedtuple('Step', 'seconds targets loss padding')  # one optimizer step's record
Batch = namedtuple('Batch', 'tensors plan targets share padding')  # what one step needs, on the device


def build_model(args, mode, seed, **change):
    """The GPT of the flags (with `change`, e.g. mask= or pos=), initialised from `seed`, on its
    paradigm's attention path (PATH_RULE) unless --attn names one."""
    torch.manual_seed(seed)
    attn = args.attn or PATH_RULE[mode]
    config = dict(vocab_size=data.VOCAB_SIZE, yes_id=data.YES_ID, no_id=data.NO_ID, n_layer=args.n_layer,
                  n_head=args.n_head, n_embd=args.n_embd, n=args.n, mask=args.mask, pos=args.pos,
                  block_size=args.block_size, dropout=args.dropout, attn=attn)
    return GPT(GPTConfig(**{**config, **change})).to(args.device)


def learning_rate(step, total_steps, lr):
    """nanoGPT's schedule: linear warm-up over the first 10% of steps, then cosine decay to lr/10."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))


def train(model, ds, units, mode, args, seed, desc='train', save=None, resume=None):
    """AdamW on BCE at target [SUM]s over `units` of `ds`, SW prompts or DTI streams by `mode`.
    The schedule is drawn up front from `seed`; `resume` (a checkpoint) continues at its step;
    save(state) is called every --ckpt-every steps and at the end. Returns one Step per step; the
    clock covers the batch and its plan (on CUDA: waiting for them), forward, backward, update."""
    rng = np.random.default_rng(seed)
    schedule = [(epoch, b) for epoch in range(args.epochs) for b in batches(units, args.batch_size, rng)]
    opt = model.configure_optimizers(args.weight_decay, args.lr)
    records = restore(resume, model, opt, len(schedule)) if resume else []
    net, ahead = wrap(model, args), batches_ahead(ds, units, mode, model, args, schedule, len(records))
    bar = tqdm(total=args.epochs * int(data.prompt_targets(units).sum()), unit='target', desc=desc,
               initial=sum(r.targets for r in records), dynamic_ncols=True, disable=True if RANK else None)
    pending, t0 = [], time.perf_counter()  # steps whose loss is not read yet (on CUDA, 10 at a time)
    model.train()
    for step in range(len(records), len(schedule)):
        # dropout draws from (seed, step, rank) alone: a resumed run, on any rank, needs no random state
        torch.manual_seed(int(np.random.SeedSequence([seed, step, RANK]).generate_state(1, np.uint64)[0]))
        for group in opt.param_groups:
            group['lr'] = learning_rate(step, len(schedule), args.lr)
        b = next(ahead)                                                        # a Batch on the device
        with autocast(args.device):
            logits = net(b.tensors['idx'], b.tensors['block'], b.tensors['role'], b.plan)  # (B, T)
            loss = ctr_loss(logits, b.tensors['label']) * b.share              # this rank's part of the mean
        opt.zero_grad(set_to_none=True)
        (loss * WORLD).backward()                                              # DDP averages over ranks
        opt.step()
        pending.append((schedule[step][0], b, loss.detach().float()))
        last = step + 1 == len(schedule)
        saving = save and args.ckpt_every and (step + 1) % args.ckpt_every == 0
        if len(pending) == (10 if 'cuda' in args.device else 1) or saving or last:
            records += read_losses(pending, time.perf_counter() - t0, step, save and args.out, bar)
            pending, t0 = [], time.perf_counter()
        if saving or (save and last):
            save(dict(model=model, optimizer=opt, records=records, epoch=schedule[step][0]))
            t0 = time.perf_counter()                                           # a write is no step's time
    bar.close()
    check_weights(model, len(schedule), schedule[-1][0], save and args.out)
    return records


def pad_multiple(args):
    """Batches are padded to a multiple of this: 128 on CUDA and under --compile (few shapes)."""
    return 128 if 'cuda' in args.device or args.compile else 1


def make_batch(ds, units, mode, model, args):
    """One step's Batch, built on the host: this rank's share of the prompts of `units` collated
    (on CUDA and under --compile T is a multiple of 128, so that few shapes occur) and its plan,
    on the device; the batch's targets, this rank's share of them, its share of padding."""
    prompts = unit_prompts(units, mode, args.n)                                # (prompts, 3)
    mine = prompts[RANK::WORLD]                                                # this rank's share only
    b = data.collate(ds, mine if len(mine) else prompts[:1], pad_multiple(args))
    if pad_multiple(args) > 1 and len(b['idx']) == 1:  # compile: B=1 is a shape of its own; add a PAD row
        b = {key: torch.cat([v, torch.full_like(v, data.FILL[key])]) for key, v in b.items()}
    targets = int(data.prompt_targets(prompts).sum())
    share = int((b['label'] >= 0).sum()) / targets if len(mine) else 0.0    # a rank without prompts adds 0
    on_device = to_device(b, args.device)
    where = on_device if model.config.attn == 'flex' else b  # a BlockMask reads block and role on the device
    plan = to_device(model.attention_plan(where['block'], where['role']), args.device)
    return Batch(on_device, plan, targets, share, float((b['role'] == data.PAD).float().mean()))

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model, ds, prompts, device, max_tokens=32768):
    """Logits of every target of `prompts`, in prompt order and position order inside a prompt.
    Under torchrun each rank scores every WORLD-th prompt and all ranks gather all logits."""
    model.eval()
    tokens, out = data.prompt_tokens(ds, prompts), {}
    mine = np.arange(RANK, len(prompts), WORLD)
    order = mine[np.argsort(tokens[mine], kind='stable')].tolist()  # similar lengths together
    with tqdm(total=len(order), unit='prompt', desc='eval', leave=False, disable=RANK > 0 or None) as bar:
        while order:
            j = 1
            while j < len(order) and (j + 1) * tokens[order[j]] <= max_tokens:
                j += 1
            b = to_device(data.collate(ds, prompts[order[:j]]), device)
            with autocast(device):
                logits = model(b['idx'], b['block'], b['role']).float().cpu()  # (B, T)
            out.update((o, row[lab >= 0].numpy()) for o, row, lab in zip(order[:j], logits, b['label'].cpu()))
            bar.update(j)
            order = order[j:]
    model.train()
    if WORLD > 1:
        parts = [None] * WORLD
        dist.all_gather_object(parts, out)
        out = {o: v for part in parts for o, v in part.items()}
    logits = np.concatenate([out[o] for o in range(len(prompts))])
    if not np.isfinite(logits).all():
        die('the trained model gives non-finite logits; a smaller --lr or --weight-decay may help', code=1)
    return logits


def metrics(logits, labels):
    """AUC (None when the labels are all one class: it is undefined then), LogLoss, F1, accuracy."""
    p = 1.0 / (1.0 + np.exp(-np.clip(logits, -500, 500)))
    return dict(auc=float(roc_auc_score(labels, p)) if len(np.unique(labels)) == 2 else None,
                logloss=float(log_loss(labels, p, labels=[0, 1])), f1=float(f1_score(labels, p > 0.5,
                zero_division=0.0)), acc=float(accuracy_score(labels, p > 0.5)))


def evaluate(model, ds, evals, device):
    """{split}_{metric} of a trained model on each set of eval prompts ({split}_bayes_auc: that of
    the true probabilities, None on real data), and {split}_logits of the test splits."""
    res = {}
    for name, (prompts, prob) in evals.items():
        labels, logits = data.target_labels(ds, prompts), predict(model, ds, prompts, device)
        res.update({f'{name}_{key}': v for key, v in metrics(logits, labels).items()})
        res[f'{name}_targets'] = len(labels)
        # the AUC of the true probabilities (metrics' sigmoid keeps their order); None on real data
        res[f'{name}_bayes_auc'] = metrics(prob, labels)['auc'] if np.isfinite(prob).all() else None
        if name.startswith('test'):
            res[f'{name}_logits'] = logits.tolist()
    return res


BASELINE = "logistic regression on the item's and the window's positive rates"


def baseline(ds, n, blocks, most=1_000_000):
    """A non-neural reference: logistic regression on two rates a reader can count by hand, the
    target item's positive rate in train (leave-one-out on train targets, smoothed towards the
    overall rate) and the positive rate of the target's n-block window. Fit on the train targets
    (on `most` evenly spaced ones beyond that); returns its logits of the targets `blocks`."""
    y, train = ds['label'], ds['split'] == 0
    _, items = np.unique(ds['item'], return_inverse=True)                    # ids -> 0 .. n_items-1
    item_likes = np.bincount(items[train], weights=y[train], minlength=items.max() + 1)  # (n_items,)
    item_views = np.bincount(items[train], minlength=items.max() + 1)                    # (n_items,)
    prior = 10 * item_likes.sum() / item_views.sum()         # the likes of 10 views at the overall rate
    liked = np.r_[0, np.cumsum(y, dtype=np.int64)]           # liked[t]: likes among blocks 0 .. t-1

    def features(t):                                         # t: targets, n predecessors in their user
        own = train[t]                                       # a train target leaves its own label out
        item_rate = (item_likes[items[t]] - own * y[t] + prior) / (item_views[items[t]] - own + 10)
        return np.stack([item_rate, (liked[t] - liked[t - n]) / n], 1)      # t-n is still t's user
    fit = np.flatnonzero((data.positions(ds) >= n) & train)
    fit = fit[np.linspace(0, len(fit) - 1, min(most, len(fit))).astype(np.int64)]
    return LogisticRegression().fit(features(fit), y[fit]).decision_function(features(blocks))


# -----------------------------------------------------------------------------
# main: --mode sw and --mode dti


def run(args, ds, mode, k, prepared, seed, init=None, save=None, resume=None, **change):
    """Train one model (from the weights `init` if given, with `change` to its config) and evaluate
    it; returns its results, test logits included."""
    units, evals = prepared
    model = build_model(args, mode, seed, **change)
    if init is not None:  # an ALiBi model takes a learned-position model's weights but its wpe
        model.load_state_dict({key: v for key, v in init.items() if key in model.state_dict()})
    prompts = unit_prompts(units, mode, args.n)
    print(f'{ds["name"]}: {len(prompts)} {mode} prompts, {data.prompt_targets(units).sum()} train targets, '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, seed {seed}, '
          f'{model.config.attn} attention')
    records = train(model, ds, units, mode, args, seed, f'train {mode}', save, resume)
    targets, seconds = sum(r.targets for r in records), sum(r.seconds for r in records)
    flops, cfg, loss = flops_per_target(ds, prompts, model.config), model.config, [r.loss for r in records]
    mfu = model_flops_utilization(flops * targets / seconds / WORLD, args.device, mode)
    res = evaluate(model, ds, evals, args.device)
    return dict(mode=mode, dataset=args.dataset, n=args.n, k=k, mask=cfg.mask, pos=cfg.pos, attn=cfg.attn,
                n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, seed=seed,
                targets_trained=targets, train_seconds=seconds, steps=len(records),
                mean_targets_per_step=targets / len(records), time_per_target_ms=1000 * seconds / targets,
                median_time_per_target_ms=median_ms_per_target(records),
                flops_per_target=flops, mfu=mfu,
                padding=float(np.mean([r.padding for r in records])),  # plain floats: checkpoints hold them
                first_loss=float(np.mean(loss[:10])), last_loss=float(np.mean(loss[-10:])), step_loss=loss,
                **res, bayes_auc=res.get('test_bayes_auc'))


def train_and_report(args, ckpt=None):
    """--mode sw or dti: prepare the data, train one model per seed with checkpoints in DIR, write
    results.json (the first seed's run, every seed's test AUC and LogLoss, and the interval of the
    test AUC against the baseline's), print the table."""
    t0 = time.perf_counter()
    ds = load_dataset(args)
    ckpt = run_to_continue(ckpt, ds, args.resume)  # None for a fresh run
    prepared = prepare(args, ds, args.mode, args.ks[0], eval_prompts(args, ds, args.eval_mode, args.ks[0]))
    prepare_seconds, prepare_peak_rss_mb = time.perf_counter() - t0, peak_rss_mb()
    print(f'data prepared in {prepare_seconds:.1f}s, peak memory so far {prepare_peak_rss_mb:.0f} MB')
    lock(args.out)
    done = ckpt['done'] if ckpt else []  # the results of the seeds that finished
    for seed in range(args.seed + len(done), args.seed + args.seeds):
        state = dict(args=vars(args), data=data.fingerprint(ds), seed=seed, done=done)
        done.append(run(args, ds, args.mode, args.ks[0], prepared, seed, save=lambda s: save_checkpoint(
            args.out, {**s, **state}), resume=ckpt if ckpt and ckpt['seed'] == seed else None))
    if ckpt and not all(same_kind(r, done[-1]) for r in done):  # only a hand-edited checkpoint gets here
        die(f"{ckpt['path']}: a damaged checkpoint (its finished seeds' results are not this run's)")
    blocks = data.target_blocks(prepared[1]['test'][0])
    base = baseline(ds, args.n, blocks)
    res = dict(done[0], **over_seeds(done, 'test_auc'), **over_seeds(done, 'test_logloss'), seeds=args.seeds,
               **{f'baseline_test_{m}': v for m, v in metrics(base, ds['label'][blocks]).items()},
               baseline_diff_ci=paired_ci(ds, blocks, [r['test_logits'] for r in done], [base] * len(done)),
               prepare_seconds=prepare_seconds, prepare_peak_rss_mb=prepare_peak_rss_mb,
               peak_rss_mb=peak_rss_mb())
    res = dict({key: v for key, v in res.items() if not key.endswith('_logits')}, args=vars(args))
    print_results(res, write_json(args.out, 'results.json', res))
    return res


def main(argv=None):
    WARNED.clear()  # each run says its warnings
    SAVED.clear()  # and offers to resume from its own checkpoints only
    args = parse_args(argv)
    warnings.simplefilter('ignore')  # stderr holds this program's lines only (no numpy overflow notes)
    try:
        check_out(args)
        ckpt = checkpoint_in(args)  # a checkpoint in DIR: the run to continue, or one of the same flags
        setup_distributed(args)
        if args.mode in ('sw', 'dti'):
            return train_and_report(args, ckpt)
        if args.mode == 'bench':
            return bench(args)
        return (compare if args.mode == 'compare' else ablation)(args, load_dataset(args))
    except KeyboardInterrupt:  # Ctrl-C: what is on disk, and how to go on from it
        path = os.path.join(args.out, 'ckpt.pt')  # resumable: the one it was resuming, or one it wrote
        die(f'interrupted; rerun with --resume to continue from {path}' if os.path.isfile(path) and
            (args.resume or path in SAVED) else 'interrupted; no checkpoint was written', code=130)
    finally:
        unlock()
        if WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()

# =============================================================================
# everything below serves experiments and long runs
# -----------------------------------------------------------------------------
# experiments: SW against DTI (compare), the ablation, attention paths (bench)


def compare(args, ds):
    """SW and DTI step for step: per seed, one SW run and one DTI run per k, all from the same initial
    weights on the same data and mask. SW trains on the batches of the first k, so SW step j takes
    the targets of DTI step j at that k (another k batches other units). Speed-ups are ratios of
    median step times per target of the first seed's runs, in this process."""
    evals = {k: eval_prompts(args, ds, args.eval_mode, k) for k in args.ks}  # the same targets for every k
    prepared = {('sw', args.ks[0]): prepare(args, ds, 'sw', args.ks[0], evals[args.ks[0]]),
                **{('dti', k): prepare(args, ds, 'dti', k, evals[k]) for k in args.ks}}
    lock(args.out)
    runs = {key: [] for key in prepared}
    for seed in range(args.seed, args.seed + args.seeds):
        init = build_model(args, 'sw', seed).state_dict()
        for (mode, k), p in prepared.items():
            runs[mode, k].append(run(args, ds, mode, k, p, seed, init))
    blocks = data.target_blocks(evals[args.ks[0]]['test'][0])
    sw = runs.pop(('sw', args.ks[0]))
    s, logits = sw[0], lambda rs: [r['test_logits'] for r in rs]
    first = lambda rs, prefix: {f'{prefix}_{key}': rs[0][key] for key in (
        'flops_per_target', 'mfu', 'train_seconds', 'padding', 'attn', 'steps', 'step_loss')}
    mean = lambda rs, prefix: {f'{prefix}_test_{m}': over_seeds(rs, f'test_{m}')[f'test_{m}_mean']
                               for m in ('auc', 'logloss', 'f1')}  # None where an AUC is undefined
    ms = lambda rs: rs[0]['median_time_per_target_ms']
    sweep = [dict(k=k, dti_time_per_target_ms=ms(r), **first(r, 'dti'), **mean(r, 'dti'),
                  speedup=ms(sw) / ms(r),
                  analytic_speedup=s['flops_per_target'] / r[0]['flops_per_target'],
                  ideal_ratio=args.n * k / (args.n + k), dti_test_auc_seeds=[x['test_auc'] for x in r],
                  test_auc_diff_ci=paired_ci(ds, blocks, logits(r), logits(sw)))
             for (_, k), r in runs.items()]
    base = metrics(baseline(ds, args.n, blocks), ds['label'][blocks])
    res = dict(sweep[0], **first(sw, 'sw'), **mean(sw, 'sw'), sw_time_per_target_ms=ms(sw),
               sw_test_auc_seeds=[r['test_auc'] for r in sw],
               **{f'baseline_test_{m}': v for m, v in base.items()},
               max_step_loss_diff=float(np.abs(np.subtract(s['step_loss'], sweep[0]['dti_step_loss'])).max()),
               mean_targets_per_step=s['mean_targets_per_step'], bayes_auc=s['bayes_auc'], n=args.n,
               mask=args.mask, pos=args.pos, targets_trained=s['targets_trained'], seeds=args.seeds,
               torch=torch.__version__, threads=torch.get_num_threads(), sweep=sweep, args=vars(args))
    print_compare(res, write_json(args.out, 'compare.json', res))
    return res


def print_compare(res, path):
    print(f"\nSW vs DTI, n={res['n']}, mask={res['mask']}, pos={res['pos']}, {res['targets_trained']} "
          f"targets trained each in {res['sw_steps']} paired steps of {res['mean_targets_per_step']:.0f} "
          f"targets on average; medians of step time per target")
    print_table(['', 'path', 'ms/target', 'speed-up', 'analytic', 'n*k/(n+k)', 'padding'],
                [['SW', res['sw_attn'], f"{res['sw_time_per_target_ms']:.3f}", '1.0x', '1.0x', '',
                  f"{res['sw_padding']:.1%}"]]
                + [[f"DTI k={r['k']}", r['dti_attn'], f"{r['dti_time_per_target_ms']:.3f}",
                    *(f'{r[key]:.1f}x' for key in ('speedup', 'analytic_speedup', 'ideal_ratio')),
                    f"{r['dti_padding']:.1%}"] for r in res['sweep']])
    print()
    print_table(['', 'test AUC', 'LogLoss', 'F1', 'train s', "minus SW's AUC [95% interval]"],
                [['SW', seeds_cell(res['sw_test_auc_seeds']), num(res['sw_test_logloss']),
                  num(res['sw_test_f1']), f"{res['sw_train_seconds']:.1f}", '']]
                + [[f"DTI k={r['k']}", seeds_cell(r['dti_test_auc_seeds']), num(r['dti_test_logloss']),
                    num(r['dti_test_f1']), f"{r['dti_train_seconds']:.1f}",
                    difference(r['dti_test_auc'], res['sw_test_auc'], r['test_auc_diff_ci'])]
                   for r in res['sweep']]
                + [['test LR', *(num(res[f'baseline_test_{m}']) for m in ('auc', 'logloss', 'f1')), '', '']])
    print(f'test LR: {BASELINE}; the interval: a paired bootstrap over test users and seeds')
    if res['seeds'] == 1 and len(res['sweep']) > 1:
        print(f"with one seed an interval holds the test set's noise only: DTI at k != {res['k']} trains on "
              f"other steps than SW, so training noise comes on top (--seeds N draws it too)")
    print(f"largest difference of SW's and DTI k={res['k']}'s loss at the same step: "
          f"{res['max_step_loss_diff']:.2e}")
    print(f'wrote {path}')


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
    weights on the same targets, once per seed; the SW rows train once, on the batches of the
    largest k, so they take the steps of its DTI rows. Every model is scored twice: on SW
    prompts (how a deployed model meets one new target) and on streams of its k (SW rows: the
    largest k, on whose batches they train). Each row gets a paired interval against the first."""
    K = max(args.ks)
    evals = {k: {f'{split}_{way}': p for way, mode in (('sw', 'sw'), ('stream', 'dti'))
                 for split, p in eval_prompts(args, ds, mode, k).items()} for k in args.ks}
    rows = [dict(name=name, mode=mode, mask=mask, pos=pos or args.pos, k=None if mode == 'sw' else k, runs=[])
            for name, mode, mask, pos in ABLATION for k in ([K] if mode == 'sw' else args.ks)]
    key = lambda r: (r['mode'], r['k'], r['pos'])
    prepared = {key(r): prepare(args, ds, r['mode'], r['k'] or K, evals[r['k'] or K], r['pos']) for r in rows}
    lock(args.out)
    for seed in range(args.seed, args.seed + args.seeds):
        init = build_model(args, 'sw', seed, pos='learned').state_dict()
        for r in rows:
            print(f"\n{r['name']}: --mode {r['mode']} --mask {r['mask']} --pos {r['pos']} --k {r['k'] or K}")
            r['runs'].append(run(args, ds, r['mode'], r['k'] or K, prepared[key(r)], seed, init,
                                 mask=r['mask'], pos=r['pos']))
    ref, sw_rows = rows[0]['runs'], {r['mask']: r for r in rows if r['mode'] == 'sw'}
    logits = lambda runs, way: [x[f'test_{way}_logits'] for x in runs]
    for r in rows:
        runs = r.pop('runs')
        r.update({key: runs[0][key] for key in ('attn', 'train_seconds', 'median_time_per_target_ms',
                                                'flops_per_target', 'targets_trained', 'steps', 'step_loss')})
        for split, way, m in itertools.product(('valid', 'test'), ('sw', 'stream'), ('auc', 'logloss')):
            r.update(over_seeds(runs, f'{split}_{way}_{m}', f'{split}_{m}_{way}'))
            r[f'{split}_{m}_{way}'] = r[f'{split}_{m}_{way}_mean']
        for way in ('sw', 'stream'):
            blocks = data.target_blocks(evals[K][f'test_{way}'][0])
            r[f'test_auc_{way}_diff_ci'] = paired_ci(ds, blocks, logits(runs, way), logits(ref, way))
        r['speedup'] = ref[0]['median_time_per_target_ms'] / r['median_time_per_target_ms']
        if r['k'] == K:  # same steps and weights as the SW row of its mask (SW rows come first: done)
            diff = np.abs(np.subtract(r['step_loss'], sw_rows[r['mask']]['step_loss']))
            over = np.flatnonzero(diff > 1e-4)
            r.update(paired_sw_row=sw_rows[r['mask']]['name'],
                     step_loss_diff_first=float(diff[0]), step_loss_diff_max=float(diff.max()),
                     first_step_diff_over_1e4=int(over[0]) + 1 if len(over) else None)
    both = next(r for r in rows if r['name'] == 'DTI, both' and r['k'] == K)
    res = dict(dataset=args.dataset, n=args.n, k=args.ks, seeds=args.seeds, reference=rows[0]['name'],
               targets_trained=rows[0]['targets_trained'], steps=rows[0]['steps'],
               bayes_auc=ref[0]['test_sw_bayes_auc'], max_step_loss_diff=both['step_loss_diff_max'],
               torch=torch.__version__, threads=torch.get_num_threads(), rows=rows, args=vars(args))
    print_ablation(res, write_json(args.out, 'ablation.json', res))
    return res


def print_ablation(res, path):
    rows, K = res['rows'], max(res['k'])
    bayes = '' if res['bayes_auc'] is None else f", Bayes AUC {res['bayes_auc']:.4f}"
    print(f"\nablation on {res['dataset']}, n={res['n']}, {res['targets_trained']} targets trained by every "
          f"row, {res['seeds']} seed(s){bayes}; test metrics scored on SW prompts and on streams of the "
          f"row's k (SW rows: k={K})")
    print_table(['', 'k', 'mask', 'pos', 'path', 'AUC SW', 'LogLoss SW', 'AUC stream', 'LogLoss stream',
                 'train s', 'ms/target', 'speed-up'],
                [[r['name'], str(r['k'] or ''), r['mask'], r['pos'], r['attn'],
                  *(seeds_cell(r[f'test_{m}_{w}_seeds']) for w in ('sw', 'stream')
                    for m in ('auc', 'logloss')),
                  f"{r['train_seconds']:.1f}", f"{r['median_time_per_target_ms']:.3f}",
                  f"{r['speedup']:.1f}x"] for r in rows])
    print(f"\ntest AUC minus {res['reference']}'s, with its paired 95% interval (over test users and seeds"
          f"{'' if res['seeds'] > 1 else '; with one seed it holds no training noise'})")
    print_table(['', 'k', 'scored on SW prompts', 'scored on streams'],
                [[r['name'], str(r['k'] or ''), *(difference(r[f'test_auc_{w}'], rows[0][f'test_auc_{w}'],
                                                  r[f'test_auc_{w}_diff_ci']) for w in ('sw', 'stream'))]
                 for r in rows[1:]])
    print(f"\nat k={K} every DTI row takes the same steps as the SW row with its mask, from the same "
          f"weights; their losses at the same step differ by (first seed)")
    print_table(['', 'against', 'step 1', 'first step > 1e-4', 'largest'],
                [[r['name'], r['paired_sw_row'], f"{r['step_loss_diff_first']:.1e}",
                  str(r['first_step_diff_over_1e4'] or '-'), f"{r['step_loss_diff_max']:.1e}"]
                 for r in rows if r['k'] == K])
    print(f"valid metrics, every seed's numbers and step losses are in {path}")


def bench(args):
    """Block-sparse vs dense attention (and FlexAttention on CUDA), forward + backward on one long
    stream (n context blocks, then 440 targets: 3,631 tokens at n=20), interleaved; on CUDA each timing
    waits for the device."""
    ds = data.synthetic(n_users=1, min_len=args.n + 440, max_len=args.n + 440, n=args.n)
    b = to_device(data.collate(ds, data.dti_streams(np.array([[0, args.n + 440]]), args.n, 440)), args.device)
    if args.pos == 'learned' and b['idx'].size(1) > args.block_size:
        die(f"a prompt of {b['idx'].size(1)} tokens is longer than --block-size {args.block_size} "
            f"(learned positions)")
    lock(args.out)
    cuda = 'cuda' in args.device
    paths = ['sparse', 'dense'] + ['flex'] * (cuda and not args.dropout)  # FlexAttention has no dropout
    models = {a: build_model(args, 'dti', args.seed, attn=a) for a in paths}
    times = {attn: [] for attn in models}

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
    res = dict(tokens=b['idx'].size(1), n=args.n, mask=args.mask, pos=args.pos, device=args.device,
               **{f'{attn}_ms': ms[attn] for attn in times}, speedup=ms['dense'] / ms['sparse'],
               **{f'{attn}_peak_mb': peak[attn] for attn in times}, torch=torch.__version__,
               threads=torch.get_num_threads())
    path = write_json(args.out, 'bench.json', res)
    print(f"one stream of {res['tokens']} tokens, n={args.n}, mask={args.mask}, forward + backward "
          f"(median of 5)")
    for attn in times:
        mb = np.nan if peak[attn] is None else peak[attn]  # None: not measurable here
        print(f"{attn:>7} {ms[attn]:9.1f} ms   peak host memory of a step {mb:7.0f} MB")
    print(f"sparse is {res['speedup']:.1f}x faster than dense; wrote {path}")
    return res

# -----------------------------------------------------------------------------
# measures: memory, time and FLOPs


PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # bf16 dense peaks of the datasheets, for MFU


def model_flops_utilization(flops_per_second, device, mode):
    """One process's model FLOP/s over its GPU's datasheet peak (MFU), printed; None off those GPUs."""
    peak = next((v for gpu, v in PEAK_FLOPS.items() if 'cuda' in device and gpu in
                 torch.cuda.get_device_name(device)), None)
    if peak:
        print(f'{mode}: {flops_per_second / 1e12:.1f} TFLOP/s of model FLOPs per GPU, '
              f'MFU {flops_per_second / peak:.1%}')
    return flops_per_second / peak if peak else None


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


def peak_rss_mb():
    """The most memory (resident set, MB) this process has held so far."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 2**10)


def median_ms_per_target(records):
    """Median over steps of step time per target, warm-up (the first 5% of steps, at least 3) left out."""
    steady = records[max(3, len(records) // 20):] or records
    return 1000 * float(np.median([r.seconds / r.targets for r in steady]))


def flops_per_target(ds, prompts, config, most=50_000):
    """Analytic training FLOPs per target of `prompts` under a model config (model.training_flops),
    beyond `most` prompts the mean over `most` evenly spaced ones."""
    prompts = prompts[np.linspace(0, len(prompts) - 1, min(most, len(prompts))).astype(np.int64)]
    order = np.argsort(data.prompt_tokens(ds, prompts), kind='stable')
    total = sum(training_flops(config, b['block'], b['role'])
                for b in (data.collate(ds, prompts[order[s:s + 64]]) for s in range(0, len(order), 64)))
    return total / int(data.prompt_targets(prompts).sum())

# -----------------------------------------------------------------------------
# reports: the table of a sw or dti run, seeds, and paired intervals (what a difference is worth)


def print_results(res, path):
    """The table of a --mode sw or dti run: valid, test and the baseline's test metrics, the
    spread over seeds, the difference to the baseline with its interval, the speed."""
    print()
    print_table(['', 'AUC', 'LogLoss', 'F1', 'Acc', 'Bayes AUC'],
                [[name, *(num(res[f'{key}_{m}']) for m in ('auc', 'logloss', 'f1', 'acc')),
                  num(res.get(f'{key}_bayes_auc'))]
                 for name, key in (('valid', 'valid'), ('test', 'test'), ('test LR', 'baseline_test'))])
    print(f'test LR: the non-neural baseline, {BASELINE}')
    if res['seeds'] > 1:
        print(f"(valid and test above: seed {res['seed']}) over {res['seeds']} seeds: test AUC "
              f"{seeds_cell(res['test_auc_seeds'])}, LogLoss {seeds_cell(res['test_logloss_seeds'])}")
    diff = difference(res['test_auc_mean'], res['baseline_test_auc'], res['baseline_diff_ci'])
    print(f"test AUC minus LR's: {diff} (95% interval, a bootstrap over test users"
          f"{' and seeds' * (res['seeds'] > 1)})")
    print(f"{res['mode']}: {res['targets_trained']} targets in {res['train_seconds']:.1f}s, "
          f"{res['time_per_target_ms']:.3f} ms per target, {res['flops_per_target'] / 1e6:.2f} MFLOP per "
          f"target (analytic); wrote {path}")


def over_seeds(runs, key, name=None):
    """{name}_seeds: runs[i][key] for every seed, with their _mean and _std (None if one is None)."""
    v, name = [r[key] for r in runs], name or key
    whole = None not in v
    return {f'{name}_seeds': v, f'{name}_mean': float(np.mean(v)) if whole else None,
            f'{name}_std': float(np.std(v)) if whole else None}


def seeds_cell(values):
    """A table cell: the value of one seed, or mean ± standard deviation over several."""
    return '-' if None in values else num(values[0]) if len(values) == 1 else \
        f'{np.mean(values):.4f} ± {np.std(values):.4f}'


def difference(a, b, ci):
    """a - b as '+0.0123 [+0.0050, +0.0190]', with ' not different' where the interval holds 0."""
    if None in (a, b, ci):
        return '-'
    return f'{a - b:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]' + (' not different' if ci[0] <= 0 <= ci[1] else '')


def weighted_auc(scores, labels, weights):
    """AUC of scores (N,) for labels (N,) under R sets of per-target weights (R, N): the weighted
    share of (positive, negative) pairs ranked right, a tie counting half. -> (R,)"""
    order = np.argsort(scores, kind='stable')
    s, y, w = scores[order], labels[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])                     # each group of tied scores
    tie = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))   # (N,) its group
    w0 = np.add.reduceat(np.where(y == 0, w, 0.0), starts, axis=1)             # (R, groups) negatives' weight
    w1 = np.where(y == 1, w, 0.0)                                              # (R, N) positives' weight
    return (w1 * (np.cumsum(w0, 1) - 0.5 * w0)[:, tie]).sum(1) / (w1.sum(1) * w0.sum(1))


def paired_ci(ds, blocks, a, b, resamples=1000):
    """95% interval of AUC(a) - AUC(b), two models' (seeds, targets) logits of the targets
    `blocks`, by a bootstrap that draws users (a user's targets go together) and seeds with
    replacement: the statistic is the mean over the drawn seeds of the paired difference, so the
    interval holds both the test set's noise and training's. [0, 0] for a == b."""
    a, b, labels = np.atleast_2d(a), np.atleast_2d(b), ds['label'][blocks]
    if len(np.unique(labels)) < 2:
        return None
    _, user = np.unique(np.searchsorted(ds['user_start'], blocks, side='right'), return_inverse=True)
    rng, U, diffs = np.random.default_rng(0), user.max() + 1, []
    for r in range(0, resamples, 100):  # 100 resamples at a time: (100, targets) weights
        draws = [np.bincount(rng.integers(0, U, U), minlength=U) for _ in range(min(100, resamples - r))]
        w = np.stack(draws)[:, user]                                           # (R, N) its user's draws
        d = np.stack([weighted_auc(x, labels, w) - weighted_auc(y, labels, w) for x, y in zip(a, b)])  # (S,R)
        diffs.append(np.take_along_axis(d, rng.integers(0, len(a), d.shape), 0).mean(0))  # seeds drawn too
    diffs = np.concatenate(diffs)  # NaN where a draw left one class out: AUC is undefined there
    return [float(v) for v in np.nanpercentile(diffs, [2.5, 97.5])] if np.isfinite(diffs).any() else None

# -----------------------------------------------------------------------------
# long runs: checkpoints and resume, compile, torchrun, CUDA

CKPT_FORMAT = 'dti-minimal checkpoint v3'  # v3: dropout draws from (seed, step, rank)
SHAPE_ARGS = ['n_layer', 'n_head', 'n_embd', 'pos', 'block_size']  # a checkpoint's weights fit these only
RUN_ARGS = ['mode', 'dataset', 'users', 'history', 'n', 'ks', 'mask', 'dropout', 'epochs',  # what a resumed
            'max_train_targets', 'batch_size', 'lr', 'weight_decay', 'seed', 'seeds', 'attn',  # run keeps
            'max_eval_targets', 'eval_mode']
CKPT_TYPES = dict(model=dict, optimizer=dict, records=list, args=dict, data=str, seed=int, done=list)


def save_checkpoint(folder, state):
    """DIR/ckpt.pt: what training needs to go on (weights, AdamW's state, the step records; dropout
    draws from the seed, step and rank alone) and which run it is (args, the data set's fingerprint, the
    seed, finished seeds' results). Never with non-finite weights; written to a temporary file,
    then renamed; a failed write stops the run and keeps the previous one."""
    model, path = state['model'], os.path.join(folder, 'ckpt.pt')
    check_weights(model, len(state['records']), state['epoch'], folder)
    try:
        if not RANK:
            torch.save(dict(format=CKPT_FORMAT, model=model.state_dict(),
                            optimizer=state['optimizer'].state_dict(),
                            records=[tuple(r) for r in state['records']],
                            **{key: state[key] for key in ('args', 'data', 'seed', 'done')}), path + '.tmp')
            SAVED.add(path)
            os.replace(path + '.tmp', path)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save raises a RuntimeError
        kept = f'the previous {path} is kept' if os.path.exists(path) else 'no checkpoint was written'
        die(f"cannot write {path} ({' '.join(str(e).split())[:200]}); stopped, {kept}", code=1)
    finally:  # a write cut short (a full disk, Ctrl-C) leaves no temporary file behind
        if os.path.isfile(path + '.tmp') and not RANK:
            os.remove(path + '.tmp')


def checkpoint_in(args):
    """DIR/ckpt.pt, if any, checked against this run's flags, any problem one line: the run to
    continue (--resume), or one a fresh sw or dti run may overwrite, since it has the same flags
    (the same run, if its data set is too: train_and_report checks that)."""
    path = os.path.join(args.out, 'ckpt.pt')
    if args.resume and not os.path.isfile(path):
        die(f'--resume: no checkpoint at {path}')
    if args.mode not in ('sw', 'dti') or not os.path.isfile(path):
        return None
    foreign = f'{path} is not a checkpoint of this program; remove it or pass another --out'
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)  # tensors and plain types only
    except Exception as e:
        die(f'{path}: not a readable checkpoint ({type(e).__name__})' if args.resume else foreign)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        die(f'{path}: not a dti-minimal checkpoint ({CKPT_FORMAT})' if args.resume else foreign)
    for key, kind in CKPT_TYPES.items():
        if not isinstance(ckpt.get(key), kind):
            die(f'{path}: a damaged checkpoint ({key!r} is missing or not a {kind.__name__})')
    if any(torch.is_tensor(ckpt['args'].get(key)) for key in SHAPE_ARGS + RUN_ARGS):
        die(f'{path}: a damaged checkpoint (a tensor among its flags)')
    show = lambda v: 'not given' if v is None else ','.join(map(str, v)) if isinstance(v, (list, tuple)) \
        else v
    for key in SHAPE_ARGS + RUN_ARGS:
        old, new, flag = ckpt['args'].get(key), getattr(args, key), '--' + key.replace('_', '-')
        flag = '--k' if key == 'ks' else flag
        if old != new and not args.resume:
            die(f'{path} holds another run ({flag} {show(old)}, here {show(new)}); continue it with its '
                f'flags and --resume, or pass another --out')
        if old != new:
            die(f'--resume: {flag} {show(new)} changes the model shape (the checkpoint has {show(old)})'
                if key in SHAPE_ARGS else f'--resume: {flag} {show(new)} differs from the checkpoint '
                                          f'({show(old)}); a resumed run must be the same run')
    done = ckpt['done']  # the results of the seeds before ckpt['seed'], in order
    seeds_fit = [isinstance(r, dict) and r.get('seed') == args.seed + i for i, r in enumerate(done)]
    if args.resume and (ckpt['seed'] != args.seed + len(done) or not all(seeds_fit)):
        die(f"{path}: a damaged checkpoint (seed {ckpt['seed']} after {len(done)} finished seeds from --seed "
            f"{args.seed})")
    return dict(ckpt, path=path)


def run_to_continue(ckpt, ds, resume):
    """The checkpoint of checkpoint_in once its data set is known to be `ds`, if --resume; else None
    (a fresh run may then overwrite it). Another data set is one line."""
    fingerprint = data.fingerprint(ds)
    if ckpt and ckpt['data'] != fingerprint:
        differs = f"({ds['name']} has the fingerprint {fingerprint}, the checkpoint {ckpt['data']})"
        die(f"--resume: the data set differs from the checkpoint's {differs}; a resumed run must be the same "
            f"run" if resume else f"{ckpt['path']} holds a run on another data set {differs}; pass another "
            f"--out")
    return ckpt if resume else None


def same_kind(r, ref):
    """A finished seed's results `r` have the keys of `ref`, this run's, values of the same types
    (a float or None where either may be: an AUC on one class, mfu on a CPU) and as many test logits."""
    kind = lambda key, v: len(v) if key == 'test_logits' and isinstance(v, list) else type(v)
    optional = lambda key: (key == 'mfu' or key.endswith('auc')) and {type(r[key]), type(ref[key])} <= {
        float, type(None)}
    return r.keys() == ref.keys() and all(kind(key, r[key]) == kind(key, ref[key]) or optional(key)
                                          for key in ref)


def restore(ckpt, model, opt, n_steps):
    """Load a checkpoint's weights, optimizer and step records into this run; returns the step
    records. A checkpoint that does not fit is one line, exit 2."""
    try:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
        for p in model.parameters():  # a foreign optimizer state may load, then fail at its first step
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise ValueError(f'an optimizer state of shape {tuple(v.shape)} for a parameter '
                                     f'of {tuple(p.shape)}')
        records = [Step(*r) for r in ckpt['records']]
        written = lambda r: [type(v) for v in r] == [float, int, float, float] and math.isfinite(r.loss) \
            and r.targets
        if not 0 < len(records) <= n_steps or not all(map(written, records)):
            raise ValueError(f'{len(records)} step records in a run of {n_steps} steps, or one no step '
                             f'writes')
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ValueError('non-finite weights')
    except Exception as e:  # whatever a damaged checkpoint raises
        die(f"{ckpt['path']}: does not fit this run ({' '.join(str(e).split())[:300]})")
    return records


def read_losses(pending, seconds, step, folder, bar):
    """Step records of the pending steps (epoch, Batch, loss on the device): the losses read at once
    (on CUDA the one wait for the device in 10 steps), their `seconds` shared by targets. A
    non-finite loss stops the run (exit 1), naming its step and the last good checkpoint."""
    losses = torch.stack([loss for *_, loss in pending])
    if WORLD > 1:
        dist.all_reduce(losses)  # each rank holds its part of every batch's mean
    losses, targets = losses.tolist(), sum(b.targets for _, b, _ in pending)
    for i, ((epoch, _, _), loss) in enumerate(zip(pending, losses)):
        if not math.isfinite(loss):
            stop(f'the loss is {loss} at step {step + 2 - len(pending) + i} (epoch {epoch + 1})', folder)
    bar.set_postfix(epoch=pending[-1][0] + 1, loss=f'{losses[-1]:.4f}', refresh=False)
    bar.update(targets)
    return [Step(seconds * b.targets / targets, b.targets, loss, b.padding)
            for (_, b, _), loss in zip(pending, losses)]


def check_weights(model, step, epoch, folder):
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        stop(f'the weights are not finite after step {step} (epoch {epoch + 1})', folder)


def stop(what, folder):
    """A run that went wrong: one line (exit 1) saying what, and which checkpoint is good."""
    last = folder and os.path.join(folder, 'ckpt.pt')
    kept = f'the last good checkpoint is {last}' if last and os.path.exists(last) else \
        'no checkpoint was written'
    die(f'{what}; stopped, {kept}', code=1)


def wrap(model, args):
    """The model as the step calls it: torch.compile'd with --compile, in DDP under torchrun."""
    net = torch.compile(model, dynamic=True) if args.compile else model
    return torch.nn.parallel.DistributedDataParallel(net) if WORLD > 1 else net


def batches_ahead(ds, units, mode, model, args, schedule, start):
    """The Batches of schedule[start:], in order. On CUDA the next one is built in a background
    thread while the device runs this one, copied through pinned memory without waiting."""
    make = lambda step: make_batch(ds, units[schedule[step][1]], mode, model, args)
    if 'cuda' not in args.device:
        yield from map(make, range(start, len(schedule)))
        return
    with ThreadPoolExecutor(1) as host:
        ahead = host.submit(make, start) if start < len(schedule) else None
        for step in range(start, len(schedule)):
            b = ahead.result()
            ahead = host.submit(make, step + 1) if step + 1 < len(schedule) else None
            yield b


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled='cuda' in str(device))


def to_device(x, device):
    """A batch or a plan (tensors, Tiles, a BlockMask, or dicts and lists of them) on `device`;
    from the CPU to CUDA through pinned memory, without waiting for the copy."""
    if isinstance(x, torch.Tensor):
        pin = 'cuda' in str(device) and x.device.type == 'cpu'
        return (x.pin_memory() if pin else x).to(device, non_blocking=True)
    if isinstance(x, Tiles):
        return Tiles(*(to_device(t, device) for t in x))
    if isinstance(x, (dict, list)):
        return {key: to_device(v, device) for key, v in x.items()} if isinstance(x, dict) else \
            [to_device(v, device) for v in x]
    return x.to(device)  # a BlockMask


def setup_distributed(args):
    """Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK): join the process group, gloo on CPU,
    nccl on CUDA with one GPU per process. Only rank 0 prints and writes files."""
    global RANK, WORLD
    if 'RANK' not in os.environ:
        return
    if args.mode not in ('sw', 'dti'):
        die(f'torchrun runs --mode sw or dti, not {args.mode}')
    if 'cuda' in args.device:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group('nccl' if 'cuda' in args.device else 'gloo')
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    if RANK:
        sys.stdout = open(os.devnull, 'w')

# -----------------------------------------------------------------------------
# plumbing: checks no flag type covers, the output folder and its lock, JSON, tables

OUTPUTS = dict(sw=['results.json', 'ckpt.pt'], dti=['results.json', 'ckpt.pt'], compare=['compare.json'],
               ablation=['ablation.json'], bench=['bench.json'])  # what each mode writes into --out
HELD = []  # the lock files this process holds
WARNED = set()  # the warnings printed so far
SAVED = set()  # the checkpoints this process wrote: Ctrl-C offers to resume from them


def die(msg, code=2):
    """Bad input (exit code 2) or a failed run (1): one line on stderr (a line break in a path shown
    as \\n), no traceback. Under torchrun rank 0 speaks for all: the ranks check the same flags and
    data; the others exit with the same code, and torchrun names any rank that fails alone."""
    if os.environ.get('RANK', '0') == '0':  # torchrun's rank, set before setup_distributed reads it
        print(f'dti_minimal.py: error: {msg}'.replace('\n', '\\n'), file=sys.stderr)
    sys.exit(code)


def warn(msg):
    """Once per message: compare and ablation prepare the same targets for every row."""
    if not RANK and msg not in WARNED:
        WARNED.add(msg)
        print(f'dti_minimal.py: warning: {msg}', file=sys.stderr)


# every count's bounds, in one place: beyond them a count is a typo, not a plan
BOUNDS = dict(users=(1, 100_000), n=(1, 100_000), n_layer=(1, 1000), n_head=(1, 1000), n_embd=(1, 2**31),
              block_size=(1, 10**12), epochs=(1, 10**9), batch_size=(1, 10**9), max_train_targets=(1, 10**12),
              max_eval_targets=(1, 10**12), ckpt_every=(0, 10**12), seeds=(1, 1000), seed=(0, 2**63 - 1))


def check_args(args):
    """Everything about the flags that can be checked before any work: one line and exit 2."""
    flag = lambda name: '--' + name.replace('_', '-')
    synthetic = args.dataset.startswith('synthetic')
    args.history, history = tuple(args.history), ','.join(map(str, args.history))
    if len(args.history) != 2:
        die(f'argument --history: takes MIN,MAX (two whole numbers), got {history!r}')
    if not 1 <= args.history[0] <= args.history[1] <= 100_000:
        die(f'argument --history: needs 1 <= MIN <= MAX <= 100000, got {history}')
    if args.mode == 'bench' and args.n > 500:
        die(f'--mode bench times dense attention over n + 440 blocks, quadratic in n: '
            f'--n at most 500, got {args.n}')
    if args.mode != 'bench' and synthetic and args.n >= args.history[1]:
        die(f'--n {args.n}: no synthetic user has more than {args.history[1]} interactions (--history), '
            f'so none has a target')
    for name, (lo, hi) in BOUNDS.items():
        v = getattr(args, name)
        if v is not None and not lo <= v <= hi:
            what = 'in 0 .. 2**63-1' if name == 'seed' else f'at most {hi}' if v > hi else \
                '0 or more' if lo == 0 else f'at least {lo}'
            die(f'{flag(name)} must be {what}, got {v}')
    args.ks = args.ks or ([5, 50] if args.mode == 'ablation' else [50])
    if not 1 <= min(args.ks) <= max(args.ks) <= 100_000:
        die(f'argument --k: must be at least 1 and at most 100000, got {",".join(map(str, args.ks))}')
    if len(set(args.ks)) < len(args.ks):
        die(f'argument --k: {next(k for k in args.ks if args.ks.count(k) > 1)} is listed more than once')
    if len(args.ks) > 1 and args.mode not in ('compare', 'ablation'):
        die('a list of k values is a sweep: use it with --mode compare or ablation')
    if args.users * args.history[1] > 12_000_000:
        die(f'--users {args.users} --history {history} allows {args.users * args.history[1]} interactions, '
            f'more than this script generates (at most 12000000)')
    if args.n_embd % args.n_head:
        die(f'--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}')
    learned = args.pos == 'learned' or args.mode == 'ablation'  # ablation trains learned positions too
    params = data.VOCAB_SIZE * args.n_embd + args.n_layer * 12 * args.n_embd ** 2 + \
        (args.block_size * args.n_embd if learned else 0)  # ALiBi has no position table
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if 16 * params > memory:  # weights, gradients and AdamW's two moments in fp32
        die(f'a model of {params / 1e9:.1f}B parameters needs {16 * params / 2**30:.0f} GiB to train, '
            f'more than this machine\'s {memory / 2**30:.0f} GiB')
    for name, ok, what in (('lr', args.lr > 0, 'a finite number > 0'), ('dropout', 0 <= args.dropout < 1,
                           'in [0, 1)'), ('weight_decay', args.weight_decay >= 0, 'a finite number >= 0')):
        if not (ok and math.isfinite(getattr(args, name))):
            die(f'{flag(name)} must be {what}, got {getattr(args, name)}')
    if args.data_dir is not None and (synthetic or args.mode == 'bench'):
        die(f'--data-dir is for MovieLens; --dataset {args.dataset} is generated here' if synthetic else
            '--data-dir: --mode bench times a generated stream and reads no data')
    if args.resume and args.mode not in ('sw', 'dti'):
        die('--resume continues a --mode sw or dti run')
    if not args.out.strip():
        die('--out must name a folder')
    args.out = os.path.normpath(args.out)  # a/new/../b is a/b: no folder a/new is made on the way
    args.device = check_device(args.device, args.attn, args.dropout)
    return args

def check_prompts(args, ds, mode, units, evals, pos=None):
    """A run's train units and eval prompts: none empty, train targets of both classes (eval targets
    of one class are a warning), a schedule that fits in memory, and (with learned positions: `pos`,
    by default --pos) no prompt longer than --block-size."""
    if not len(units) or not all(len(prompts) for prompts, _ in evals.values()):
        die(f'{ds["name"]} has no train, valid or test targets with n={args.n} predecessors')
    for name, prompts in [('train', units)] + [(name.split('_')[0], p) for name, (p, _) in evals.items()]:
        labels = np.unique(data.target_labels(ds, prompts))
        word = 'positive' if labels[0] else 'negative'
        if len(labels) == 1 and name == 'train':
            die(f'{ds["name"]}: the train targets are all {word}; nothing to learn')
        if len(labels) == 1:
            warn(f'the {name} targets are all {word}: their AUC is undefined, null in the results')
    if args.epochs * len(units) > 10_000_000:  # the schedule is held in memory
        die(f'--epochs {args.epochs} over {len(units)} streams plans {args.epochs * len(units)} stream draws '
            f'before step 1, more than 10000000')
    longest = max(int(data.prompt_tokens(ds, p).max()) for p in [unit_prompts(units, mode, args.n)]
                  + [p for p, _ in evals.values()])
    longest = -(-longest // pad_multiple(args)) * pad_multiple(args)  # what make_batch pads a batch to
    if (pos or args.pos) == 'learned' and longest > args.block_size:
        die(f'a prompt of {longest} tokens is longer than --block-size {args.block_size} (learned positions)')


def check_device(device, attn, dropout):
    """--device resolved (auto: cuda, else mps, else cpu) and checked, with what --attn needs of it."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else \
            'cpu'
    try:
        kind = torch.device(device).type
    except RuntimeError:
        die(f'unknown --device {device!r}')
    if kind not in ('cpu', 'cuda', 'mps'):
        die(f'--device {device}: use auto, cpu, cuda, cuda:N or mps')
    if kind == 'cuda' and (torch.device(device).index or 0) >= torch.cuda.device_count():
        die(f'--device {device}: no such CUDA device here')
    if kind == 'mps' and not torch.backends.mps.is_available():
        die(f'--device {device}: no MPS device here')
    if attn == 'flex' and kind != 'cuda':
        die('--attn flex trains on CUDA only: FlexAttention has no backward on a CPU in torch 2.13 '
            '(use --attn dense or sparse)')
    if attn == 'flex' and dropout:
        die('--attn flex has no dropout: use --dropout 0 or another --attn')
    return device


def check_out(args):
    """--out is, or can be made, a folder we can write into: its missing folders are made and a
    file written in it, then all of that removed again, so that a path too long or a read-only
    disk is refused before any work; no file the run will write, nor its temporary twin, exists
    there as something other than a file."""
    if os.environ.get('RANK', '0') != '0':  # only rank 0 writes; ranks probing one folder would race
        return
    made = data.missing_folders(args.out)
    try:
        for folder in reversed(made):
            os.mkdir(folder)
        tempfile.NamedTemporaryFile(dir=args.out, prefix='.dti-probe-').close()  # made, then removed
    except OSError:
        die(f'--out {args.out} is a file, not a folder' if os.path.isfile(args.out) else
            f'output folder {args.out} cannot be written')
    finally:
        for folder in made:
            if os.path.isdir(folder):
                os.rmdir(folder)
    for p in [os.path.join(args.out, name + tmp) for name in OUTPUTS[args.mode] for tmp in ('', '.tmp')] + \
            [os.path.join(args.out, '.lock')]:
        if os.path.lexists(p) and not os.path.isfile(p):
            die(f'{p} exists and is not a file; the run would write it')


def lock(folder):
    """Hold `folder` for this run, so that two runs never write one folder at once: DIR/.lock holds
    this process's pid; a lock whose process still runs is refused in one line, a stale one (its
    process gone) is taken over, and this process's own is kept (a notebook may run compare twice).
    unlock() releases it when main returns or exits."""
    path, made = os.path.join(folder, '.lock'), False
    for _ in range(2 * (not RANK)):
        try:
            os.makedirs(folder, exist_ok=True)
            with open(path, 'x') as f:
                made = True
                f.write(str(os.getpid()))
            return HELD.append(path)
        except FileExistsError:
            pid = lock_holder(path)
            if pid == os.getpid():  # this process's own
                return HELD.append(path)
            if pid is not None:
                die(f'{folder} is in use by another run (pid {pid}, {path}); wait for it or pass another '
                    f'--out')
            with contextlib.suppress(FileNotFoundError):  # another run may have removed it already
                os.remove(path)  # stale: its run is gone
        except OSError as e:  # a full disk: the empty lock file is removed again
            if made:
                os.remove(path)
            die(f'cannot write {path} ({e.strerror}); stopped', code=1)


def lock_holder(path):
    """The pid in a lock file if its process runs, else None. An empty file is read again for a
    moment: the run that made it may not have written its pid yet."""
    for _ in range(10):
        try:
            with open(path, 'rb') as f:
                text = f.read().decode('ascii', 'replace')  # any bytes: what is not a pid is stale
        except FileNotFoundError:
            return None
        if text:
            break
        time.sleep(0.05)
    if not text.strip().isdigit() or int(text) == 0:  # digits only: a pid, never a process group
        return None
    try:
        os.kill(int(text), 0)  # ProcessLookupError if no such process
    except PermissionError:  # it runs, as another user
        return int(text)
    except (OSError, OverflowError):
        return None
    return int(text)


def unlock():
    while HELD:
        path = HELD.pop()
        if os.path.exists(path):
            os.remove(path)


def write_json(folder, name, obj):
    """Atomically (a temporary file, then os.replace) and strictly: a non-finite float is null.
    Rank 0 only; a failed write is one line (exit 1), the temporary file removed."""
    finite = lambda o: (o if math.isfinite(o) else None) if isinstance(o, float) else \
        {k: finite(v) for k, v in o.items()} if isinstance(o, dict) else \
        [finite(v) for v in o] if isinstance(o, (list, tuple)) else o
    path = os.path.join(folder, name)
    try:
        if not RANK:
            os.makedirs(folder, exist_ok=True)
            with open(path + '.tmp', 'w') as f:
                json.dump(finite(obj), f, indent=2, allow_nan=False)
            os.replace(path + '.tmp', path)
    except OSError as e:
        die(f'cannot write {path} ({e.strerror or e}); stopped', code=1)
    finally:  # a write cut short (a full disk, Ctrl-C) leaves no temporary file behind
        if os.path.isfile(path + '.tmp') and not RANK:
            os.remove(path + '.tmp')
    return path


def num(v, spec='.4f'):
    """A table cell: the number, or '-' for None (an AUC on one class, a Bayes AUC on real data)."""
    return '-' if v is None else format(v, spec)


def print_table(header, rows):
    """Rows of cells (strings) under a header: the first column left-aligned (row names), the others
    right-aligned, each as wide as its widest cell."""
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    for r in [header] + rows:
        print('  '.join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))


if __name__ == '__main__':
    main()
