import threading

import pytest

from walkforge.errors import WalkforgeError
from walkforge.runtimes.kv_pool import KVPagePool, PoolSpec


def make(num_pages: int = 8, page_size: int = 4) -> KVPagePool:
    return KVPagePool(PoolSpec(layers=2, kv_heads=1, head_dim=8, page_size=page_size, num_pages=num_pages))


def test_spec_layout():
    assert make().spec.shape == (2, 2, 8, 4, 1, 8)


def test_allocate_rounds_up_to_pages_and_tables_pad_with_minus_one():
    pool = make()
    a = pool.allocate("a", 5)  # 2 pages of 4
    b = pool.allocate("b", 1)
    assert len(a) == 2 and len(b) == 1 and not set(a) & set(b)
    table = pool.block_table(["a", "b"])
    assert table.dtype.name == "int64"
    assert table.tolist() == [a, [b[0], -1]]
    assert pool.free_pages == 5


def test_exhaustion_names_need_and_free():
    pool = make(num_pages=3)
    pool.allocate("a", 8)
    with pytest.raises(WalkforgeError, match="need 2 pages, 1 free of 3"):
        pool.allocate("b", 5)
    assert pool.free_pages == 1  # the failed request took nothing


def test_allocate_all_is_all_or_nothing():
    pool = make(num_pages=4)
    with pytest.raises(WalkforgeError, match="need 5 pages for 2 requests, 4 free of 4"):
        pool.allocate_all({"a": 8, "b": 9})
    assert pool.free_pages == 4
    assert pool.allocate_all({"a": 8, "b": 8}) == {"a": [0, 1], "b": [2, 3]}


def test_free_returns_pages_and_long_runs_do_not_leak():
    pool = make()
    for i in range(100):
        pool.allocate(i, 3 + i % 9)
        pool.allocate(("x", i), 7)
        pool.free(i)
        pool.free(("x", i))
    assert pool.free_pages == pool.num_pages


def test_double_allocate_is_refused():
    pool = make()
    pool.allocate("a", 1)
    with pytest.raises(WalkforgeError, match="already holds"):
        pool.allocate("a", 1)


def test_freed_pool_allocates_like_a_fresh_one():
    pool, fresh = make(), make()
    pool.allocate("a", 9)
    pool.allocate("b", 5)
    pool.free("a")
    pool.free("b")
    assert pool.allocate("c", 13) == fresh.allocate("c", 13) == [0, 1, 2, 3]


def test_threads_never_share_a_page():
    """8 threads allocate and free concurrently; a page held by one is never handed to another."""
    pool = make(num_pages=64, page_size=1)
    owned: set[int] = set()
    guard = threading.Lock()
    errors: list[str] = []

    def worker(t: int) -> None:
        for i in range(200):
            pages = pool.allocate((t, i), 1 + (t + i) % 3)
            with guard:
                if owned & set(pages):
                    errors.append(f"thread {t} got held pages {sorted(owned & set(pages))}")
                owned.update(pages)
            with guard:
                owned.difference_update(pages)
            pool.free((t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and pool.free_pages == 64
