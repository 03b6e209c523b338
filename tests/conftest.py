import os
from collections import Counter

import torch

# The test models are tiny: one thread is fastest, and torch's spinning OpenMP threads can slow a step 50x
# when the cores are shared with other processes. Child processes inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Put the files that hold a test marked `long` first, then the others by test count, most first.

    pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands the files to its workers in this order. Its own
    order, by test count alone, ran the few-test files of minutes-long tests last, each on one worker while the
    others idled: a longest-first order lets the short files fill in around them.
    """
    counts = Counter(item.path for item in items)
    long_files = {item.path for item in items if item.get_closest_marker("long")}
    items.sort(key=lambda item: (item.path not in long_files, -counts[item.path]))  # stable: a file stays whole
