"""bench/transfer_quality.py's pool: the data folder every quality run trains on and every search selects on."""

import numpy as np


def test_the_pool_holds_every_chip_but_the_test_chips_with_their_labels(demo_root, tmp_path):
    from bench.transfer_quality import write_pool
    from planet_batch.data.datasets import labelled_split, train_valid_split

    every = labelled_split(demo_root)
    test = write_pool(demo_root, tmp_path / "pool", test_chips=40, test_seed=1000)
    pool = labelled_split(tmp_path / "pool")  # the product reads it as any data folder
    assert len(test) == 40 and len(pool) == len(every) - 40
    assert not set(pool.names) & set(test.names)
    assert set(pool.names) | set(test.names) == set(every.names)
    source = dict(zip(every.names, every.targets))
    assert all(np.array_equal(source[n], t) for n, t in zip(pool.names, pool.targets))
    same = {n: p for n, p in zip(every.names, every.paths)}
    assert all((tmp_path / "pool" / "train-jpg" / f"{n}.jpg").resolve().read_bytes() == open(same[n], "rb").read()
               for n in pool.names[:5])
    assert write_pool(demo_root, tmp_path / "again", 40, 1000).names == test.names  # the same test chips each run
    train, valid = train_valid_split(tmp_path / "pool", 0.2, 42)
    assert len(train) + len(valid) == len(pool)
