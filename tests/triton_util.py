"""Checking Triton kernels without a GPU: run them under Triton's interpreter (in a subprocess, since
TRITON_INTERPRET must be set before triton decorates them), compile them for sm_90 (H100/H200) with
Triton's own compiler, and read register spills from the cubin with the cuobjdump Triton ships."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def run_interpreted(script: str, *args: str) -> None:
    """Run `script` (a test file whose __main__ runs its cases on CPU tensors) under the interpreter."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "cases passed" in proc.stdout, proc.stdout[-3000:]


def has_cxx() -> bool:
    """inductor's CPU backend (torch.compile on CPU tensors) needs a C++ compiler."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int) -> bytes:
    """Compile `kernel` (a triton.jit function) for sm_90 to a cubin; no GPU needed."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton cannot compile ahead of time")
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    assert list(sig) == kernel.arg_names, (list(sig), kernel.arg_names)
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]
    assert cubin
    return cubin


def resource_usage(cubin: bytes) -> str:
    """cuobjdump -res-usage's line for the kernel (REG, STACK, SHARED, LOCAL, ...)."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"no cuobjdump at {tool}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return next(x for x in usage.splitlines() if "REG:" in x).strip()


def assert_no_spills(cubin: bytes, what) -> None:
    line = resource_usage(cubin)
    assert " STACK:0 " in f" {line} " and " LOCAL:0 " in f" {line} ", (what, line)


def run_cases(device, compiled: bool, kernel_check, module_check) -> None:
    """The kernels against the reference math, then through their module eager and (compiled) under
    torch.compile."""
    kernel_check(device)
    module_check(device, compiled=False)
    if compiled:
        module_check(device, compiled=True)


def check_on(device, script: str, kernel_check, module_check) -> None:
    """On a GPU directly; on the CPU in a subprocess under the interpreter (compiled too when a C++
    compiler is there for inductor's CPU backend), `script` being the test file whose __main__ calls
    `interpreted_main`."""
    if device.type == "cuda":
        run_cases(device, True, kernel_check, module_check)
    else:
        run_interpreted(script, str(int(has_cxx())))


def round_bf16_like_the_gpu() -> None:
    """Triton's interpreter converts fp32 to bf16 by truncation (its round-to-nearest option drops the
    carry), while the GPU rounds to nearest even, as torch does: route that one conversion through torch,
    so interpreted kernels round as they will on the card and bf16 accuracy comparisons are fair."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def rounded(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return convert(data, src, dst, rounding_mode)

    interpreter._convert_float = rounded


def interpreted_main(name: str, kernel_check, module_check) -> None:
    import torch
    torch.set_num_threads(1)
    round_bf16_like_the_gpu()
    run_cases(torch.device("cpu"), sys.argv[1:] == ["1"], kernel_check, module_check)
    print(f"{name} cases passed")
