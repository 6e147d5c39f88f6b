"""A GPU-only check shared by kernel tests (imports nothing that configures Triton)."""

import torch


def assert_no_host_sync(step) -> None:
    """Runs ``step()`` once to compile (and autotune) outside the check, then again with CUDA's sync debug mode
    raising on any host synchronisation."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
