"""Datasheet figures of the GPUs the planner and tools/gpu_check.py know (dense, no sparsity).

Sources: NVIDIA's H100, H200, A100, L40S, L4 and A10 datasheets; NVLink is per direction (the
datasheets quote both directions together); the network is the one 400 Gbit/s (NDR) or
200 Gbit/s (HDR) InfiniBand adapter per GPU of a DGX/HGX node.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak
    tf32_tflops: float  # dense tf32 tensor-core peak (fp32 recipes)
    memory_gb: float  # decimal GB, as the datasheets give it
    nvlink_gbps: float  # Gbit/s per GPU, one direction
    network_gbps: float  # Gbit/s per GPU across nodes

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


PLANNED = {
    "h100": Device("NVIDIA H100 SXM", 989.4, 494.7, 80, 3600, 400),
    "h200": Device("NVIDIA H200 SXM", 989.4, 494.7, 141, 3600, 400),
    "a100": Device("NVIDIA A100 SXM 80GB", 312.0, 156.0, 80, 2400, 200),
}
GPUS_PER_NODE = 8

# torch.cuda.get_device_name() substrings → dense bf16 peak, TFLOP/s; the first match wins, so
# the longer names come first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.4),
                    ("H200", 989.4), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
                    ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2))


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch names it; None when not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None
