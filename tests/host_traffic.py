"""A dispatch mode that finds host syncs and host-to-device copies in a step run on a non-host device
(tests/test_contract.py, tests/test_backbones.py): what the GPU hot loop must not do and what a CUDA graph
capture (core/graphs.py) cannot take. On `meta` tensors the step runs without data, so a CPU machine checks it."""
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class HostTraffic(TorchDispatchMode):
    """Records the ops of a step on a device (here `meta`) that read a device value on the host or feed
    host tensors into device work: host syncs in the hot loop, and what a CUDA graph capture cannot take."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.repeat_interleave.Tensor")

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(a.device.type != "cpu" for a in tensors)
        to_device = kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu"
        if on_device and str(func).startswith(self.SYNCS) and kwargs.get("output_size") is None:
            raise AssertionError(f"{func} reads a device value on the host (see the stack)")
        # A copy of any host tensor to the device waits for the GPU (a blocking copy from pageable memory);
        # a 0-dim host tensor as an operand of device work is passed as a number and costs nothing.
        copy = str(func).startswith(("aten._to_copy", "aten.copy_", "aten.lift_fresh"))
        host = [a for a in tensors if a.device.type == "cpu" and (a.dim() > 0 or copy)]
        if host and (on_device or to_device):      # host-only work (e.g. a sampler's time grid) is fine
            self.found.add(f"{func} with host tensors of shapes {[tuple(a.shape) for a in host]}")
        return func(*args, **kwargs)
