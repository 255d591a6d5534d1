"""MovieLens loading on tiny fixture files written here, in every format the loader reads: the same
interactions give the same data set, the CTR rules hold, and every bad input is one line, exit 2."""
import csv
import subprocess
import sys
import tempfile
import hashlib
import http.client
import json
import os
import urllib.request
import zipfile

import numpy as np
import pytest

import data
import dti_minimal
from conftest import ROOT, as_lists, one_line_error

# item id -> (title with year, genres); item 2 has a latin-1 title, item 5 no year
ITEMS = {1: ('Toy Story (1995)', ['Animation', "Children's", 'Comedy']), 2: ('Misérables, Les (1995)', ['Drama', 'Musical']),
         3: ('GoldenEye (1995)', ['Action', 'Adventure', 'Thriller']), 4: ('Seven (Se7en) (1995)', ['Crime', 'Thriller']),
         5: ('unknown', ['unknown']), 6: ('Film-Noir Test (1950)', ['Film-Noir', 'Sci-Fi'])}


def world(n_users=12, length=20, seed=0):
    """Ratings (user, item, rating, timestamp): random, then two fixed rows with a tied timestamp."""
    rng = np.random.default_rng(seed)
    rows = [(u, int(rng.integers(1, 7)), int(rng.integers(1, 6)), int(t))
            for u in range(1, n_users + 1) for t in rng.choice(np.arange(1000, 3000), length, replace=False)]
    return rows + [(99, 5, 4, 2500), (99, 2, 1, 2500)]  # user 99: a tie, item 5 listed first; too short for n=3


def write(folder, fmt, rows, items=ITEMS):
    """Write the files of one format into folder (created); return the --data-dir to pass."""
    os.makedirs(folder, exist_ok=True)

    def put(name, lines, encoding):
        with open(os.path.join(folder, name), 'w', encoding=encoding, newline='\n') as f:
            f.write(''.join(line + '\n' for line in lines))
    if fmt in ('grouplens', 'zip'):
        put('u.data', [f'{u}\t{i}\t{r}\t{t}' for u, i, r, t in rows], 'latin-1')
        put('u.item', [f'{i}|{title}|01-Jan-1995||http://x|' + '|'.join('1' if g in genres else '0' for g in data.ML100K_GENRES)
                       for i, (title, genres) in items.items()], 'latin-1')
        if fmt == 'zip':
            path = str(folder) + '.zip'
            with zipfile.ZipFile(path, 'w') as z:
                for name in ('u.data', 'u.item'):
                    z.write(os.path.join(folder, name), f'ml-100k/{name}')
            return path
    elif fmt == 'recbole':
        put('ml-100k.inter', ['user_id:token\titem_id:token\trating:float\ttimestamp:float']
            + [f'{u}\t{i}\t{r}\t{t}' for u, i, r, t in rows], 'utf-8')
        split_title = lambda t: (t[:-7], t[-5:-1]) if t.endswith(')') and t[-5:-1].isdigit() else (t, 'unkonwn')
        put('ml-100k.item', ['item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq']
            + [f'{i}\t' + '\t'.join(split_title(title)) + '\t' + ' '.join(genres) for i, (title, genres) in items.items()],
            'utf-8')
    elif fmt == 'ml-1m':
        put('ratings.dat', [f'{u}::{i}::{r}::{t}' for u, i, r, t in rows], 'latin-1')
        put('movies.dat', [f'{i}::{title}::' + '|'.join(genres) for i, (title, genres) in items.items()], 'latin-1')
    elif fmt == 'csv':  # ml-20m and ml-25m: headers, UTF-8, titles with a comma quoted
        put('ratings.csv', ['userId,movieId,rating,timestamp'] + [f'{u},{i},{r},{t}' for u, i, r, t in rows], 'utf-8')
        with open(os.path.join(folder, 'movies.csv'), 'w', encoding='utf-8', newline='') as f:
            w = csv.writer(f, lineterminator='\n')
            w.writerow(['movieId', 'title', 'genres'])
            w.writerows([i, title, '|'.join(genres)] for i, (title, genres) in items.items())
    return str(folder)


def texts(ds, user):
    enc = data.get_tokenizer()
    return [enc.decode(ids) for ids, _ in data.user_blocks(ds, user)]


def same(a, b):
    return all(np.array_equal(a[key], b[key], equal_nan=key == 'prob') for key in
               ('tokens', 'token_start', 'label', 'item', 'split', 'prob', 'user_start'))


def test_every_format_gives_the_same_data_set(tmp_path):
    rows = world()
    ref = data.movielens('ml-100k', write(tmp_path / 'g', 'grouplens', rows))
    assert same(ref, data.movielens('ml-100k', write(tmp_path / 'z', 'zip', rows)))
    assert same(ref, data.movielens('ml-100k', write(tmp_path / 'r', 'recbole', rows)))
    assert same(ref, data.movielens('ml-1m', write(tmp_path / 'm', 'ml-1m', rows)))
    for name in ('ml-20m', 'ml-25m'):
        assert same(ref, data.movielens(name, write(tmp_path / name, 'csv', rows)))
    assert '"Misérables, Les (1995)"' in open(tmp_path / 'ml-20m' / 'movies.csv', encoding='utf-8').read()  # quoted
    # a folder holding the extracted ml-100k/ folder, or ml-100k.zip, is found as well
    write(tmp_path / 'parent' / 'ml-100k', 'grouplens', rows)
    assert same(ref, data.movielens('ml-100k', str(tmp_path / 'parent')))
    assert len(ref['user_start']) == 14 and ref['name'] == 'ml-100k' and np.isnan(ref['prob']).all()


def test_ctr_rules_text_labels_order_and_ties(tmp_path):
    rows = world()
    ds = data.movielens('ml-100k', write(tmp_path / 'g', 'grouplens', rows))
    users, _, _, items = as_lists(ds)
    first = sorted((t, i, r) for u, i, r, t in rows if u == 1)
    assert items[0].tolist() == [i for _, i, _ in first]                      # time order
    assert [y for _, y in users[0]] == [int(r >= 4) for _, _, r in first]     # label = rating >= 4
    assert texts(ds, 12) == ['Misérables, Les (1995) | Drama, Musical', 'unknown | unknown']  # tie: item 2 first
    assert 'Toy Story (1995) | Animation, Children\'s, Comedy' in {s for u in range(13) for s in texts(ds, u)}


def test_split_by_global_time_quantiles(tmp_path):
    rows = [(1 + t % 3, 1 + t % 6, 4, t) for t in range(1, 11)]  # times 1..10 across 3 users
    ds = data.movielens('ml-100k', write(tmp_path / 'g', 'grouplens', rows))
    got = {}
    for u, split in enumerate(as_lists(ds)[1]):
        got.update(zip(sorted(t for user, _, _, t in rows if user == u + 1), split.tolist()))
    assert got == {**{t: 0 for t in range(1, 9)}, 9: 1, 10: 2}  # the quantiles are 8.2 and 9.1


def test_statistics_and_short_users(tmp_path):
    ds = data.movielens('ml-100k', write(tmp_path / 'g', 'grouplens', world()))
    line = data.describe(ds, 3)
    targets = [sum(int((np.asarray(s)[3:] == split).sum()) for s in as_lists(ds)[1]) for split in range(3)]
    assert sum(targets) == 12 * 17  # user 99 has 2 interactions: no target
    assert f'train {targets[0]}, valid {targets[1]}, test {targets[2]};' in line
    assert '13 users, 6 items, 242 interactions' in line and 'tokens per block: mean' in line
    runs, _ = data.segments(ds, 0, 3)
    assert len(runs) <= 12 and all(b - a > 3 for a, b in runs)


def test_cli_trains_on_movielens_and_prints_the_baseline(tmp_path, capsys):
    folder = write(tmp_path / 'r', 'recbole', world(n_users=30, length=30))
    res = dti_minimal.main(['--mode', 'dti', '--dataset', 'ml-100k', '--data-dir', folder, '--n', '3', '--k', '5',
                            '--n-embd', '16', '--epochs', '1', '--out', str(tmp_path / 'out')])
    saved = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert saved['dataset'] == 'ml-100k' and saved['bayes_auc'] is None and 0 <= saved['test_auc'] <= 1
    assert 0 <= saved['baseline_test_auc'] <= 1 and res['targets_trained'] > 0
    out = capsys.readouterr().out
    assert 'ml-100k: 31 users, 6 items, 902 interactions' in out and 'test LR' in out


# -----------------------------------------------------------------------------
# bad input: one line naming the file (and line), exit code 2


def cli_error(capsys, folder, dataset='ml-100k'):
    """The one line a run on this data gives; the run writes nothing (its --out never appears)."""
    out = os.path.join(tempfile.mkdtemp(), 'out')
    err = one_line_error(capsys, ['--dataset', dataset, '--n', '3', '--epochs', '1', '--out', out]
                         + (['--data-dir', folder] if folder else []))
    assert not os.path.exists(out)
    return err


@pytest.mark.parametrize('line, message', [
    ('1\t2\t3', 'u.data line 3: 3 fields, expected 4'),
    ('x\t2\t3\t100', "u.data line 3: user id 'x' is not a 64-bit integer"),
    ('1\t2.5\t3\t100', "u.data line 3: item id '2.5' is not a 64-bit integer"),
    ('1\t100000000000000000000\t3\t100', "u.data line 3: item id '100000000000000000000' is not a 64-bit integer"),
    ('9223372036854775808\t2\t3\t100', "u.data line 3: user id '9223372036854775808' is not a 64-bit integer"),
    ('1\t2\t6\t100', "u.data line 3: rating '6' is not a number in 1..5"),
    ('1\t2\t0\t100', "u.data line 3: rating '0' is not a number in 1..5"),
    ('1\t2\t3\tnoon', "u.data line 3: timestamp 'noon' is not a finite number"),
    ('1\t2\t3\tinf', "u.data line 3: timestamp 'inf' is not a finite number"),
    ('1\t2\t3\t-inf', "u.data line 3: timestamp '-inf' is not a finite number"),
    ('1\t2\t3\t1e400', "u.data line 3: timestamp '1e400' is not a finite number"),
    ('1\t2\tnan\t100', "u.data line 3: rating 'nan' is not a number in 1..5"),
    ('1\t77\t3\t100', 'u.data line 3: item 77 is not in'),
    # ids are ASCII digits: Python's int() would read 1_0 as 10, and other scripts' digits too
    ('1_0\t2\t3\t100', "u.data line 3: user id '1_0' is not a 64-bit integer"),
    ('\u0661\u0662\t2\t3\t100', "u.data line 3: user id '\u0661\u0662' is not a 64-bit integer"),
    ('1\t2\t3\t1_000', "u.data line 3: timestamp '1_000' is not a finite number"),
    ('1\t2\t3\t1997.09.22', "u.data line 3: timestamp '1997.09.22' is not a finite number"),  # a date
    ('1\t2\t..\t100', "u.data line 3: rating '..' is not a number in 1..5"),
    ('\t', 'u.data line 3: 2 fields, expected 4'),  # a line of whitespace is not an empty line
    # GroupLens' older sets have whole stars only
    ('1\t2\t3.5\t100', "u.data line 3: rating '3.5' is not a number in 1..5 (whole stars)"),
])
def test_malformed_rating_lines(tmp_path, capsys, line, message):
    folder = write(tmp_path / 'g', 'grouplens', world())
    lines = open(os.path.join(folder, 'u.data')).read().splitlines()
    lines[2] = line
    open(os.path.join(folder, 'u.data'), 'w').write('\n'.join(lines) + '\n')
    assert message in cli_error(capsys, folder)


def test_an_unreadable_data_dir_is_one_line(tmp_path, capsys, monkeypatch):
    """A folder this user may not list (root may list any, so the refusal is simulated)."""
    folder, listdir = write(tmp_path / 'g', 'grouplens', world()), os.listdir

    def refuse(path='.'):
        if str(path).startswith(str(folder)):
            raise PermissionError(13, 'Permission denied', path)
        return listdir(path)
    monkeypatch.setattr(os, 'listdir', refuse)
    assert f'{folder}: cannot be read (Permission denied)' in cli_error(capsys, folder)


def test_a_trailing_tab_in_ratings_dat_is_a_fifth_field(tmp_path, capsys):
    """np.loadtxt reads '::' as a tab, so '1::2::3::100<tab>' holds five fields: the line is named."""
    folder = write(tmp_path / 'm', 'ml-1m', world())
    lines = open(os.path.join(folder, 'ratings.dat')).read().splitlines()
    lines[2] += '\t'
    open(os.path.join(folder, 'ratings.dat'), 'w').write('\n'.join(lines) + '\n')
    assert 'ratings.dat line 3: 5 fields, expected 4' in cli_error(capsys, folder, 'ml-1m')


@pytest.mark.parametrize('fmt, name, message', [
    ('grouplens', 'u.data', 'u.data: empty file'),
    ('recbole', 'ml-100k.inter', 'ml-100k.inter: empty file'),
    ('ml-1m', 'movies.dat', 'movies.dat: empty file'),
])
def test_empty_files(tmp_path, capsys, fmt, name, message):
    folder = write(tmp_path / 'g', fmt, world())
    open(os.path.join(folder, name), 'w').close()
    assert message in cli_error(capsys, folder, 'ml-1m' if fmt == 'ml-1m' else 'ml-100k')


def test_missing_files_and_folders(tmp_path, capsys):
    folder = write(tmp_path / 'g', 'grouplens', world())
    os.remove(os.path.join(folder, 'u.item'))
    assert 'has u.data but not u.item' in cli_error(capsys, folder)
    assert 'does not exist' in cli_error(capsys, str(tmp_path / 'nowhere'))
    assert 'no ml-1m files in it' in cli_error(capsys, folder, 'ml-1m')


def test_bad_zips(tmp_path, capsys):
    (tmp_path / 'ml-100k.zip').write_text('not a zip')
    assert 'not a zip file' in cli_error(capsys, str(tmp_path / 'ml-100k.zip'))
    with zipfile.ZipFile(tmp_path / 'evil.zip', 'w') as z:
        z.writestr('ml-100k/u.data', '1\t1\t4\t1\n')
        z.writestr('../u.item', '1|a|||x|' + '|'.join('0' * 19) + '\n')
    assert "refusing member '../u.item'" in cli_error(capsys, str(tmp_path / 'evil.zip'))


# -----------------------------------------------------------------------------
# the cache and the download (a file:// URL stands in for files.grouplens.org)


def serve(monkeypatch, tmp_path, md5=None):
    """Point the ml-100k download at a fixture zip; the cache is an empty $DTI_DATA."""
    path = write(tmp_path / 'src', 'zip', world())
    real = hashlib.md5(open(path, 'rb').read()).hexdigest()
    monkeypatch.setitem(data.MOVIELENS, 'ml-100k', ('file://' + path, md5 or real))
    monkeypatch.setenv('DTI_DATA', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_download_is_md5_checked_then_cached(tmp_path, monkeypatch):
    cache = serve(monkeypatch, tmp_path)
    ds = data.movielens('ml-100k')
    assert sorted(os.listdir(cache)) == ['ml-100k.zip'] and len(ds['user_start']) == 14
    monkeypatch.setitem(data.MOVIELENS, 'ml-100k', ('file:///nowhere/ml-100k.zip', 'x'))  # no second download
    assert same(ds, data.movielens('ml-100k'))


def test_wrong_md5_keeps_nothing(tmp_path, monkeypatch, capsys):
    cache = serve(monkeypatch, tmp_path, md5='0' * 32)
    assert 'is not the expected 000' in cli_error(capsys, None)
    assert not cache.exists()  # not even the cache folder it made
    cache.mkdir()  # a cache folder that was there is kept
    assert 'is not the expected 000' in cli_error(capsys, None) and os.listdir(cache) == []


def test_no_network_no_files_says_where_to_put_them(tmp_path, monkeypatch, capsys):
    cache = serve(monkeypatch, tmp_path)
    monkeypatch.setitem(data.MOVIELENS, 'ml-100k', ('file:///nowhere/ml-100k.zip', 'x'))
    err = cli_error(capsys, None)
    assert 'download of file:///nowhere/ml-100k.zip failed' in err and f'put ml-100k.zip or its extracted folder in {cache}' in err
    assert not cache.exists()
    monkeypatch.setenv('DTI_DATA', str(tmp_path / 'new' / 'cache'))  # nor the folders made on the way
    assert 'download of file:///nowhere' in cli_error(capsys, None) and not (tmp_path / 'new').exists()


@pytest.mark.parametrize('error', [http.client.InvalidURL("nonnumeric port: 'notaport'"),  # a bad https_proxy
                                   http.client.IncompleteRead(b'')])  # the connection cut mid-way
def test_a_download_failing_outside_oserror_is_one_line(error, tmp_path, monkeypatch, capsys):
    serve(monkeypatch, tmp_path)
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(urllib.request, 'urlopen', fail)
    assert 'ml-100k: no files found and the download of file://' in cli_error(capsys, None)


# -----------------------------------------------------------------------------
# MovieLens-20M and 25M: GroupLens CSV


def test_csv_half_stars_and_labels(tmp_path):
    rows = [(1, 1 + t % 6, [0.5, 3.5, 4.0, 4.5, 5.0][t % 5], 1000 + t) for t in range(12)]
    ds = data.movielens('ml-25m', write(tmp_path / 'c', 'csv', rows))
    assert ds['label'].tolist() == [int(r >= 4) for _, _, r, _ in rows]


@pytest.mark.parametrize('name, line, index, message', [
    ('ratings.csv', 'user,movie,rating,time', 0, 'ratings.csv line 1: expected the header userId,movieId,rating,timestamp'),
    ('ratings.csv', '1,2,0.25,100', 3, "ratings.csv line 4: rating '0.25' is not a number in 0.5..5"),
    ('ratings.csv', '1,2,4.5', 3, 'ratings.csv line 4: 3 fields, expected 4'),
    ('ratings.csv', '1,x,4,100', 3, "ratings.csv line 4: item id 'x' is not a 64-bit integer"),
    ('ratings.csv', '1,2,4,inf', 3, "ratings.csv line 4: timestamp 'inf' is not a finite number"),
    ('movies.csv', 'movieId,title', 0, 'movies.csv line 1: expected the header movieId,title,genres'),
    ('movies.csv', '3,GoldenEye, The (1995),Action', 3, 'movies.csv line 4: 4 fields, expected 3 (quote a title'),
    ('movies.csv', '1,Toy Story again (1995),Comedy', 3, 'movies.csv line 4: item 1 is listed twice (first on line 2)'),
    ('movies.csv', '3,GoldenEye (1995),"Action', 3, 'movies.csv line 4: a quoted field that is not closed properly'),
])
def test_csv_bad_lines(tmp_path, capsys, name, line, index, message):
    folder = write(tmp_path / 'c', 'csv', world())
    lines = open(os.path.join(folder, name), encoding='utf-8').read().splitlines()
    lines[index] = line
    open(os.path.join(folder, name), 'w', encoding='utf-8').write('\n'.join(lines) + '\n')
    assert message in cli_error(capsys, folder, 'ml-20m')


# -----------------------------------------------------------------------------
# odd but good input loads as meant; hostile input is one line


def test_ids_are_exact_64_bit_integers(tmp_path, capsys):
    """Ids far apart, above 2**53 (where float64 merges neighbours) and negative are just ids; the
    run, its baseline included, trains and scores on them."""
    big = {10**12: ITEMS[1], 2**53: ITEMS[2], 2**53 + 1: ITEMS[3], -7: ITEMS[4], 5: ITEMS[5], 6: ITEMS[6]}
    remap = dict(zip(ITEMS, big))
    rows = [(2**53 + u % 2 if u <= 2 else u, remap[i], r, t) for u, i, r, t in world(n_users=30, length=30)]
    folder = write(tmp_path / 'g', 'grouplens', rows, items=big)
    ds = data.movielens('ml-100k', folder)
    assert len(ds['user_start']) == 32  # users 2**53 and 2**53 + 1 stay two users
    assert sorted(np.unique(ds['item']).tolist()) == sorted(big) and ds['item'].dtype == np.int64
    res = dti_minimal.main(['--dataset', 'ml-100k', '--data-dir', folder, '--n', '3', '--k', '5', '--n-embd', '16',
                            '--epochs', '1', '--out', str(tmp_path / 'out')])
    assert 0 <= res['test_auc'] <= 1 and 0 <= res['baseline_test_auc'] <= 1


def test_text_encodings_and_byte_order_marks(tmp_path):
    rows = world()
    ref = data.movielens('ml-100k', write(tmp_path / 'g', 'grouplens', rows))
    folder = write(tmp_path / 'u', 'grouplens', rows)  # one UTF-8 title among latin-1 ones
    raw = open(os.path.join(folder, 'u.item'), 'rb').read().replace('Misérables'.encode('latin-1'), 'Misérables'.encode())
    open(os.path.join(folder, 'u.item'), 'wb').write(raw)
    assert same(ref, data.movielens('ml-100k', folder))
    folder = write(tmp_path / 'r', 'recbole', rows)
    for name in ('ml-100k.inter', 'ml-100k.item'):
        path = os.path.join(folder, name)
        raw = open(path, 'rb').read()
        open(path, 'wb').write(b'\xef\xbb\xbf' + raw)
    assert same(ref, data.movielens('ml-100k', folder))


def test_an_item_listed_twice_is_an_error(tmp_path, capsys):
    folder = write(tmp_path / 'g', 'grouplens', world())
    with open(os.path.join(folder, 'u.item'), 'a', encoding='latin-1') as f:
        f.write('3|Another title (1990)|||x|' + '|'.join('0' * 19) + '\n')
    assert 'u.item line 7: item 3 is listed twice (first on line 3)' in cli_error(capsys, folder)


def zip_of(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, 'w', compression) as z:
        for name, text in members.items():
            z.writestr(name, text)
    return str(path)


def test_zip_members_are_picked_by_the_data_sets_folder(tmp_path):
    folder = write(tmp_path / 'g', 'grouplens', world())
    files = {name: open(os.path.join(folder, name), 'rb').read() for name in ('u.data', 'u.item')}
    ref = data.movielens('ml-100k', folder)
    odd = zip_of(tmp_path / 'odd.zip', {'ml-100k/u.data': files['u.data'], 'ml-100k/u.item': files['u.item'],
                                        'other/u.data': b'garbage', 'notes:2024.txt': b'a harmless name'})
    assert same(ref, data.movielens('ml-100k', odd))
    windows = zip_of(tmp_path / 'windows.zip', {'ml-100k\\u.data': files['u.data'], 'ml-100k\\u.item': files['u.item'],
                                                'other\\u.data': b'garbage'})  # folders written with \\
    assert same(ref, data.movielens('ml-100k', windows))
    beside = tmp_path / 'beside'  # a file named ml-100k (notes, say) beside ml-100k.zip is not the data
    beside.mkdir()
    os.replace(windows, beside / 'ml-100k.zip')
    (beside / 'ml-100k').write_text('my notes')
    assert same(ref, data.movielens('ml-100k', str(beside)))
    os.replace(beside / 'ml-100k.zip', beside / 'ml-100k')  # but a zip saved without its .zip is
    assert same(ref, data.movielens('ml-100k', str(beside)))


def test_an_ambiguous_zip_is_one_line(tmp_path, capsys):
    path = zip_of(tmp_path / 'two.zip', {'a/u.data': '1\t1\t4\t1\n', 'b/u.data': '1\t1\t4\t1\n',
                                         'a/u.item': '1|t|||x|' + '|'.join('0' * 19) + '\n'})
    assert 'u.data occurs 2 times (a/u.data, b/u.data); which one to read is unclear' in cli_error(capsys, path)
    with pytest.warns(UserWarning, match='Duplicate name'):  # one member written twice in the same folder
        twice = zip_of(tmp_path / 'twice.zip', {'ml-100k/u.item': '1|t|||x|' + '|'.join('0' * 19) + '\n'})
        with zipfile.ZipFile(twice, 'a') as z:
            z.writestr('ml-100k/u.data', '1\t1\t4\t1\n')
            z.writestr('ml-100k/u.data', '1\t1\t4\t2\n')
    assert 'u.data occurs 2 times (ml-100k/u.data, ml-100k/u.data); which one to read is unclear' in \
        cli_error(capsys, twice)


def test_ml_20m_files_are_not_taken_for_ml_25m(tmp_path, capsys, monkeypatch):
    """Both hold ratings.csv and movies.csv: the folder or zip they are in tells them apart, however
    the folder is named (a relative path, '.') or found ($DTI_DATA)."""
    folder = write(tmp_path / 'ml-20m', 'csv', world())
    assert 'ratings.csv: a file of ml-20m (so its folder says), not ml-25m; pass --dataset ml-20m' in \
        cli_error(capsys, folder, 'ml-25m')
    assert len(data.movielens('ml-100k', write(tmp_path / 'ml-1m', 'recbole', world()))['label'])  # its own
    monkeypatch.chdir(folder)  # file names (ml-100k.inter) say which data set it is, whatever the folder
    assert 'a file of ml-20m (so its folder says)' in cli_error(capsys, '.', 'ml-25m')
    monkeypatch.setenv('DTI_DATA', folder)
    assert 'a file of ml-20m (so its folder says)' in cli_error(capsys, None, 'ml-25m')
    path = zip_of(tmp_path / 'ml-20m.zip', {f'ml-20m/{name}': open(os.path.join(folder, name), 'rb').read()
                                             for name in ('ratings.csv', 'movies.csv')})
    assert 'ml-20m.zip:ml-20m/ratings.csv: a file of ml-20m' in cli_error(capsys, path, 'ml-25m')
    assert len(data.movielens('ml-20m', path)['label']) == len(world())


def test_timestamps_that_leave_a_split_empty_are_one_line(tmp_path, capsys):
    """All timestamps equal: every interaction falls at the 90% quantile, in test; the message says
    so rather than blaming --n."""
    folder = write(tmp_path / 'g', 'grouplens', [(u, i, 1 + i % 5, 5000) for u in range(1, 4) for i in ITEMS])
    assert 'u.data: no interaction falls in the train split (the split is by timestamp' in cli_error(capsys, folder)


def _corrupt(raw):  # flip bytes inside the first member's deflate stream
    i = raw.index(b'u.data') + len('u.data')
    return raw[:i + 20] + bytes(b ^ 0xFF for b in raw[i + 20:i + 60]) + raw[i + 60:]


def _encrypted(raw):  # the encryption bit of every header (local and central)
    for sig, at in ((b'PK\x03\x04', 6), (b'PK\x01\x02', 8)):
        i = raw.find(sig)
        while i >= 0:
            raw = raw[:i + at] + bytes([raw[i + at] | 1]) + raw[i + at + 1:]
            i = raw.find(sig, i + 4)
    return raw


def _unknown_method(raw):  # compression method 99 in every header
    for sig, at in ((b'PK\x03\x04', 8), (b'PK\x01\x02', 10)):
        i = raw.find(sig)
        while i >= 0:
            raw = raw[:i + at] + b'\x63\x00' + raw[i + at + 2:]
            i = raw.find(sig, i + 4)
    return raw


@pytest.mark.parametrize('damage, message', [
    (_corrupt, 'ml-100k/u.data: cannot be read (Error -3 while decompressing'),
    (_encrypted, 'ml-100k/u.item: encrypted; extract it yourself'),
    (_unknown_method, 'ml-100k/u.item: cannot be read (That compression method is not supported)'),
], ids=['corrupt deflate', 'encrypted', 'unknown compression'])
def test_damaged_zips_are_one_line(tmp_path, capsys, damage, message):
    folder = write(tmp_path / 'g', 'grouplens', world(n_users=40))
    path = zip_of(tmp_path / 'ml-100k.zip', {f'ml-100k/{name}': open(os.path.join(folder, name), 'rb').read()
                                             for name in ('u.data', 'u.item')})
    raw = open(path, 'rb').read()
    open(path, 'wb').write(damage(raw))
    assert message in cli_error(capsys, path)


def test_a_fifo_is_refused_not_read(tmp_path, capsys):
    folder = write(tmp_path / 'g', 'grouplens', world())
    os.remove(os.path.join(folder, 'u.data'))
    os.mkfifo(os.path.join(folder, 'u.data'))  # opening it would block until a writer comes
    assert 'u.data: not a regular file' in cli_error(capsys, folder)


def test_a_cache_folder_under_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / 'file').write_text('x')
    monkeypatch.setenv('DTI_DATA', str(tmp_path / 'file' / 'cache'))
    assert f'cache folder {tmp_path / "file" / "cache"} cannot be written' in cli_error(capsys, None)


@pytest.mark.parametrize('rating, word', [(4, 'positive'), (2, 'negative')])
def test_one_class_train_targets_stop_before_training(tmp_path, capsys, rating, word):
    rows = [(u, i, rating, t) for u, i, _, t in world()]
    assert f'ml-100k: the train targets are all {word}; nothing to learn' in cli_error(
        capsys, write(tmp_path / 'g', 'grouplens', rows))


def test_a_one_class_test_split_gives_null_auc_and_a_warning(tmp_path, capsys):
    rows = world(n_users=30, length=30)
    cut = np.quantile([t for *_, t in rows], 0.9)
    rows = [(u, i, 5 if t > cut else r, t) for u, i, r, t in rows]  # every test interaction liked
    out = tmp_path / 'out'
    dti_minimal.main(['--dataset', 'ml-100k', '--data-dir', write(tmp_path / 'g', 'grouplens', rows), '--n', '3',
                      '--k', '5', '--n-embd', '16', '--epochs', '1', '--out', str(out)])
    err = capsys.readouterr().err
    assert 'warning: the test targets are all positive: their AUC is undefined, null in the results' in err
    res = json.loads((out / 'results.json').read_text(), parse_constant=lambda c: pytest.fail(f'{c} in JSON'))
    assert res['test_auc'] is None and res['baseline_test_auc'] is None and 0 <= res['valid_auc'] <= 1
    assert res['test_logloss'] >= 0 and res['test_acc'] >= 0
    cmp = dti_minimal.main(['--mode', 'compare', '--dataset', 'ml-100k', '--data-dir', str(tmp_path / 'g'), '--n', '3',
                            '--k', '5', '--n-embd', '16', '--epochs', '1', '--out', str(tmp_path / 'cmp')])
    assert cmp['sw_test_auc'] is None and cmp['dti_test_auc'] is None and cmp['test_auc_diff_ci'] is None


# -----------------------------------------------------------------------------
# hostile input, round 2


def test_a_repeated_rating_line_is_refused(tmp_path, capsys):
    folder = write(tmp_path / 'g', 'grouplens', world())
    lines = open(os.path.join(folder, 'u.data')).read().splitlines()
    open(os.path.join(folder, 'u.data'), 'w').write('\n'.join(lines + [lines[4]]) + '\n')
    assert f'u.data line {len(lines) + 1}: repeats line 5' in cli_error(capsys, folder)


@pytest.mark.parametrize('flag', ['2', ''])
def test_a_genre_flag_other_than_0_or_1_is_refused(tmp_path, capsys, flag):
    folder = write(tmp_path / 'g', 'grouplens', world())
    lines = open(os.path.join(folder, 'u.item'), encoding='latin-1').read().splitlines()
    lines[3] = lines[3][:-1] + flag
    open(os.path.join(folder, 'u.item'), 'w', encoding='latin-1').write('\n'.join(lines) + '\n')
    assert f"u.item line 4: genre flag {flag!r} is not 0 or 1" in cli_error(capsys, folder)


def test_a_header_only_ratings_file_is_one_line_and_nothing_else(tmp_path):
    folder = write(tmp_path / 'r', 'recbole', world())
    path = os.path.join(folder, 'ml-100k.inter')
    header = open(path).read().splitlines()[0]
    open(path, 'w').write(header + '\n')
    r = subprocess.run([sys.executable, 'dti_minimal.py', '--dataset', 'ml-100k', '--data-dir', folder, '--out',
                        str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == f'dti_minimal.py: error: {path}: empty file\n', r.stderr


def test_lines_split_on_newlines_only(tmp_path):
    """A latin-1 title with byte 0x85 (an ellipsis in cp1252), a form feed or the separators
    0x1c-0x1e stays one line; a quoted CSV title keeps its line break."""
    items = {**ITEMS, 3: ('GoldenEye\x85 (1995)', ['Action']), 4: ('Seven\x0c\x1c\x1d\x1e (1995)', ['Crime'])}
    ds = data.movielens('ml-100k', write(tmp_path / 'g', 'grouplens', world(), items))
    assert {'GoldenEye\x85 (1995) | Action', 'Seven\x0c\x1c\x1d\x1e (1995) | Crime'} <= {
        t for u in range(13) for t in texts(ds, u)}
    items = {**ITEMS, 3: ('Golden\nEye (1995)', ['Action'])}
    ds = data.movielens('ml-20m', write(tmp_path / 'c', 'csv', world(), items))
    assert 'Golden\nEye (1995) | Action' in {t for u in range(13) for t in texts(ds, u)}


def test_a_huge_title_is_cut_and_counted(tmp_path, capsys):
    """A 50 KB title would make every prompt that holds it 50 KB of tokens: item texts are cut to
    data.MAX_TEXT_TOKENS tokens, and the statistics line says how many were."""
    items = {**ITEMS, 3: ('Golden' * 10_000 + ' (1995)', ['Action'])}
    folder = write(tmp_path / 'g', 'grouplens', world(n_users=30, length=30), items)
    ds = data.movielens('ml-100k', folder)
    assert np.diff(ds['token_start']).max() == data.MAX_TEXT_TOKENS and ds['cut'] == 1
    res = dti_minimal.main(['--dataset', 'ml-100k', '--data-dir', folder, '--n', '3', '--k', '5', '--n-embd', '16',
                            '--epochs', '1', '--out', str(tmp_path / 'out')])
    assert res['targets_trained'] > 0 and '(1 item texts cut to 64 tokens)' in capsys.readouterr().out
    huge = {**ITEMS, 3: ('Golden' * 40_000 + ' (1995)', ['Action'])}  # 240 KB: past csv's field limit too
    for fmt, name in [('ml-1m', 'ml-1m'), ('csv', 'ml-20m'), ('recbole', 'ml-100k')]:
        assert data.movielens(name, write(tmp_path / fmt, fmt, world(n_users=30, length=30), huge))['cut'] == 1


def test_resume_refuses_other_data(tmp_path, capsys):
    """The checkpoint holds a fingerprint of the data set: resuming on a folder with other item
    texts is one line, and nothing is rewritten."""
    flags = ['--dataset', 'ml-100k', '--n', '3', '--k', '5', '--n-embd', '16', '--epochs', '1']
    a = write(tmp_path / 'a', 'grouplens', world(n_users=30, length=30))
    b = write(tmp_path / 'b', 'grouplens', world(n_users=30, length=30), {**ITEMS, 3: ('Other (1990)', ['Drama'])})
    out = tmp_path / 'out'
    dti_minimal.main(flags + ['--data-dir', a, '--out', str(out)])
    before = {name: (out / name).read_bytes() for name in ('ckpt.pt', 'results.json')}
    err = one_line_error(capsys, flags + ['--data-dir', b, '--out', str(out), '--resume'])
    assert "--resume: the data set differs from the checkpoint's (ml-100k has the fingerprint" in err
    assert before == {name: (out / name).read_bytes() for name in ('ckpt.pt', 'results.json')}
    err = one_line_error(capsys, flags + ['--data-dir', b, '--out', str(out)])  # nor does a fresh run replace it
    assert f"{out / 'ckpt.pt'} holds a run on another data set (ml-100k has the fingerprint" in err
    assert before == {name: (out / name).read_bytes() for name in ('ckpt.pt', 'results.json')}
