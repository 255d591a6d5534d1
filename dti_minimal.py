"""
Train a from-scratch GPT for CTR prediction with sliding-window prompts (SW) or Dynamic Target
Isolation streams (DTI), evaluate it, and write DIR/results.json.

    python dti_minimal.py --mode dti            # n=20 context blocks, k=50 targets per stream
    python dti_minimal.py --mode sw             # the same model and data, one prompt per target
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from tqdm import tqdm

import data
from model import GPT, GPTConfig, ctr_loss

DATASETS = ['synthetic', 'synthetic-future', 'synthetic-far']


def die(msg):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f'dti_minimal.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = die  # one line, exit 2, also for argparse's own complaints
    p.add_argument('--mode', choices=['sw', 'dti'], default='dti', help='training paradigm')
    p.add_argument('--dataset', choices=DATASETS, default='synthetic',
                   help="data set; the -future / -far variants are leakage canaries")
    p.add_argument('--users', type=int, default=600, help='number of synthetic users')
    p.add_argument('--n', type=int, default=20, help='context blocks each target sees')
    p.add_argument('--k', type=int, default=50, help='targets per DTI stream')
    p.add_argument('--mask', choices=['isolated', 'window'], default='isolated')
    p.add_argument('--pos', choices=['alibi', 'learned'], default='alibi')
    p.add_argument('--n-layer', type=int, default=2)
    p.add_argument('--n-head', type=int, default=4)
    p.add_argument('--n-embd', type=int, default=64)
    p.add_argument('--block-size', type=int, default=2048, help='longest prompt (learned positions)')
    p.add_argument('--dropout', type=float, default=0.0)
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--batch-size', type=int, default=256, help='targets per optimizer step, both modes')
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--weight-decay', type=float, default=0.01)
    p.add_argument('--seed', type=int, default=0, help='model init and shuffling (the data is fixed)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default='out', help='output folder for results.json')
    p.add_argument('--eval-mode', choices=['sw', 'dti'], default='sw',
                   help='score valid/test targets with SW prompts (default) or DTI streams')
    args = p.parse_args(argv)
    for name in ('users', 'n', 'k', 'n_layer', 'n_head', 'n_embd', 'block_size', 'epochs', 'batch_size'):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        die(f'--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}')
    if not args.lr > 0 or not 0 <= args.dropout < 1:
        die('--lr must be > 0 and --dropout in [0, 1)')
    return args


def load_dataset(args):
    canary = args.dataset.partition('-')[2] or None
    return data.synthetic(n_users=args.users, n=args.n, canary=canary)


def build_model(args):
    config = GPTConfig(vocab_size=data.VOCAB_SIZE, yes_id=data.YES_ID, no_id=data.NO_ID,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n=args.n,
                       mask=args.mask, pos=args.pos, block_size=args.block_size, dropout=args.dropout)
    return GPT(config).to(args.device)


def make_prompts(ds, split, mode, n, k):
    """The prompts (SW) or streams (DTI) whose targets are the interactions of `split`, and the
    targets' true click probabilities in the order the prompts hold them."""
    runs, prob = data.segments(ds, split, n)
    make = (lambda r: data.sw_prompts(r, n)) if mode == 'sw' else (lambda r: data.dti_streams(r, n, k))
    return [p for r in runs for p in make(r)], prob


def batches(prompts, batch_targets, rng):
    """Shuffled batches of whole prompts holding about batch_targets targets each."""
    batch, count = [], 0
    for i in rng.permutation(len(prompts)):
        batch.append(prompts[i])
        count += int((prompts[i]['label'] >= 0).sum())
        if count >= batch_targets:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def train(model, prompts, args):
    """AdamW on BCE at target [SUM]s. Returns (targets trained, seconds spent, losses per step)."""
    rng = np.random.default_rng(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=args.lr)
    per_epoch = data.targets_of(prompts)
    steps = args.epochs * -(-per_epoch // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps + args.epochs,
                                                pct_start=0.1)
    model.train()
    seen, seconds, losses = 0, 0.0, []
    bar = tqdm(total=args.epochs * per_epoch, unit='target', desc=f'train {args.mode}', dynamic_ncols=True)
    for epoch in range(args.epochs):
        for batch in batches(prompts, args.batch_size, rng):
            t0 = time.perf_counter()
            b = {key: v.to(args.device) for key, v in data.collate(batch).items()}
            loss = ctr_loss(model(b['idx'], b['item'], b['role']), b['label'])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seconds += time.perf_counter() - t0
            n_targets = int((b['label'] >= 0).sum())
            seen += n_targets
            losses.append(loss.item())
            bar.update(n_targets)
            bar.set_postfix(epoch=epoch + 1, loss=f'{loss.item():.4f}', targets_per_s=f'{seen / seconds:.0f}')
    bar.close()
    return seen, seconds, losses


@torch.no_grad()
def predict(model, prompts, device='cpu', max_tokens=32768):
    """Logits of every target, in prompt order and position order inside a prompt."""
    model.eval()
    order = np.argsort([len(p['idx']) for p in prompts], kind='stable')  # similar lengths together
    out = [None] * len(prompts)
    i = 0
    bar = tqdm(total=len(prompts), unit='prompt', desc='eval', leave=False, dynamic_ncols=True)
    while i < len(order):
        T = len(prompts[order[i]]['idx'])
        j = i + 1
        while j < len(order) and (j - i + 1) * len(prompts[order[j]]['idx']) <= max_tokens:
            j += 1
        chunk = [prompts[o] for o in order[i:j]]
        b = {key: v.to(device) for key, v in data.collate(chunk).items()}
        logits = model(b['idx'], b['item'], b['role']).float().cpu()       # (B, T)
        for o, row, lab in zip(order[i:j], logits, b['label'].cpu()):
            out[o] = row[lab >= 0].numpy()
        bar.update(j - i)
        i = j
    bar.close()
    model.train()
    return np.concatenate(out) if out else np.zeros(0)


def metrics(logits, labels):
    p = 1.0 / (1.0 + np.exp(-logits))
    return dict(auc=roc_auc_score(labels, p), logloss=log_loss(labels, p, labels=[0, 1]),
                f1=f1_score(labels, p > 0.5), acc=accuracy_score(labels, p > 0.5))


def target_labels(prompts):
    return np.concatenate([p['label'][p['label'] >= 0] for p in prompts])


def writable_folder(path):
    """True when `path` is, or could be created as, a folder we can write into."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def main(argv=None):
    args = parse_args(argv)
    if not writable_folder(args.out):
        die(f'output folder {args.out} cannot be written')
    torch.manual_seed(args.seed)
    ds = load_dataset(args)
    train_prompts, _ = make_prompts(ds, 0, args.mode, args.n, args.k)
    evals = {name: make_prompts(ds, split, args.eval_mode, args.n, args.k) for split, name in ((1, 'valid'), (2, 'test'))}
    if not train_prompts or not all(prompts for prompts, _ in evals.values()):
        die(f'{ds["name"]} has no train, valid or test targets with n={args.n} predecessors')
    longest = max(len(p['idx']) for p in train_prompts + evals['valid'][0] + evals['test'][0])
    if args.pos == 'learned' and longest > args.block_size:
        die(f'a prompt of {longest} tokens is longer than --block-size {args.block_size} (learned positions)')
    model = build_model(args)
    print(f'{ds["name"]}: {len(train_prompts)} {args.mode} prompts, {data.targets_of(train_prompts)} '
          f'train targets, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')

    targets_trained, train_seconds, losses = train(model, train_prompts, args)
    res = dict(mode=args.mode, dataset=args.dataset, n=args.n, k=args.k, mask=args.mask, pos=args.pos,
               n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, seed=args.seed,
               targets_trained=targets_trained, train_seconds=train_seconds,
               time_per_target_ms=1000 * train_seconds / targets_trained,
               first_loss=float(np.mean(losses[:10])), last_loss=float(np.mean(losses[-10:])))
    for name, (prompts, prob) in evals.items():
        labels = target_labels(prompts)
        m = metrics(predict(model, prompts, args.device), labels)
        res.update({f'{name}_{key}': float(v) for key, v in m.items()})
        res[f'{name}_bayes_auc'] = float(roc_auc_score(labels, prob))
    res['bayes_auc'] = res['test_bayes_auc']
    res['args'] = vars(args)

    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, 'results.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, os.path.join(args.out, 'results.json'))
    print(f"\n{'':6} {'AUC':>7} {'LogLoss':>8} {'F1':>7} {'Acc':>7} {'Bayes AUC':>10}")
    for name in ('valid', 'test'):
        print(f"{name:6} {res[name + '_auc']:7.4f} {res[name + '_logloss']:8.4f} {res[name + '_f1']:7.4f} "
              f"{res[name + '_acc']:7.4f} {res[name + '_bayes_auc']:10.4f}")
    print(f"{args.mode}: {targets_trained} targets in {train_seconds:.1f}s, "
          f"{res['time_per_target_ms']:.3f} ms per target; wrote {os.path.join(args.out, 'results.json')}")
    return res


if __name__ == '__main__':
    main()
