import os

import torch

# The test models are tiny: one thread is fastest, and torch's spinning OpenMP threads can slow a step 50x
# when the cores are shared with other processes. Child processes inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
