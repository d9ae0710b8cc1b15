"""A small device profile and expert coverage for routing and cost tests."""

from __future__ import annotations

import torch

PROFILE = {
    "edge": {"name": "edge", "gflops": 10.0, "overhead_ms": 1.0, "active_power_w": 5.0, "idle_power_w": 2.0},
    "near_edge": {"name": "near", "gflops": 1000.0, "overhead_ms": 3.0, "active_power_w": 30.0, "idle_power_w": 15.0},
    "link": {"name": "wifi", "uplink_mbps": 24.0, "rtt_ms": 4.0, "radio_w_per_mbps": 0.25, "radio_base_w": 1.0},
}


# -- expert choice ---------------------------------------------------------------------------------------
COVER = torch.tensor(
    [
        [1, 1, 0, 0, 0, 0],  # expert 0: classes 0, 1
        [0, 0, 1, 1, 0, 0],  # expert 1: classes 2, 3
        [0, 0, 0, 0, 1, 1],  # expert 2: classes 4, 5
    ],
    dtype=torch.bool,
)
