"""Run by Python at the start of every process the tests launch (conftest puts this folder first on PYTHONPATH):
graph_guard.checked_call replaces torch.nn.Module.__call__, so a script's pass in eval mode that builds an autograd
graph fails the run that makes it."""

import importlib.util

if importlib.util.find_spec("torch") is not None:
    import graph_guard
    import torch

    torch.nn.Module.__call__ = graph_guard.checked_call
