from backends.numbers import ceil_div, find_multiple


def test_ceil_div_and_find_multiple():
    assert [ceil_div(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [find_multiple(n, 32) for n in (0, 1, 32, 33, 64)] == [0, 32, 32, 64, 64]
