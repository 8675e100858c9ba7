"""A check for the tests: checked_call, in place of torch.nn.Module.__call__, raises when a module runs in eval mode
with autograd on and returns a tensor that requires grad. Every script samples, scores and evaluates in eval mode and
updates in train mode, so such a pass is a rollout, reference, value or evaluation pass outside torch.no_grad(): it
keeps its autograd graph (memory that grows with every batch) for no backward."""

import torch

unchecked_call = torch.nn.Module.__call__


def builds_graph(output) -> bool:
    """Whether `output` (a tensor, a transformers ModelOutput / dict, a tuple or list of them) requires grad."""
    if isinstance(output, torch.Tensor):
        return output.requires_grad
    if isinstance(output, dict):
        return any(builds_graph(v) for v in output.values())
    if isinstance(output, (tuple, list)):
        return any(builds_graph(v) for v in output)
    return False


def checked_call(self, *args, **kwargs):
    output = unchecked_call(self, *args, **kwargs)
    if torch.is_grad_enabled() and not self.training and builds_graph(output):
        raise AssertionError(
            f"{type(self).__name__} pass in eval mode built an autograd graph: a sampling, scoring or evaluation "
            f"pass outside torch.no_grad()"
        )
    return output
