# cython: language_level=3, boundscheck=False, wraparound=False
"""The display driver's comparison of an update with its copy of the buffer, compiled."""


def differing_runs(const unsigned char[:] copy, const unsigned char[:] data, Py_ssize_t cell):
    """[(start, end), ...]: the runs of whole cells (cell bytes each) where data differs
    from copy (both the same length, a multiple of cell), as byte offsets into data."""
    cdef Py_ssize_t n = data.shape[0], i = 0, j, k
    cdef bint same
    runs = []
    if copy.shape[0] != n or n % cell:
        raise ValueError("copy and data must be the same whole number of cells")
    while i < n:
        same = True
        for k in range(cell):
            if copy[i + k] != data[i + k]:
                same = False
                break
        if same:
            i += cell
            continue
        j = i + cell
        while j < n:
            same = True
            for k in range(cell):
                if copy[j + k] != data[j + k]:
                    same = False
                    break
            if same:
                break
            j += cell
        runs.append((i, j))
        i = j
    return runs
