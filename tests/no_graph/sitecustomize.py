"""Run by Python at the start of every process the tests launch (conftest puts this folder first on PYTHONPATH): in a
training script or `evaluate.py`, graph_guard.checked_call replaces torch.nn.Module.__call__, so a pass in eval
mode that builds an autograd graph fails the run that makes it. Other programs (the benchmark's bare loops, the
built-in task's build) are left as they are."""

import importlib.util
import os
import sys

SCRIPTS = {"ppo.py", "apa.py", "awr.py", "ilql.py", "alol.py", "dpo.py", "pro.py"}
program = os.path.basename(sys.argv[0]) if sys.argv else ""
if (program in SCRIPTS or program == "evaluate.py") and importlib.util.find_spec("torch") is not None:
    import graph_guard
    import torch

    torch.nn.Module.__call__ = graph_guard.checked_call
