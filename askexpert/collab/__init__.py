"""Collaborative inference: routing the generalist's unsure samples to experts, and what that costs.

- `routing`: confidence gates, temperature scaling, top-k expert selection and answer fusion;
- `costs`: device/link profiles and the per-sample latency and energy model;
- `sweep`: accuracy/offload/latency/energy for every threshold at once, and the operating point;
- `logits`: running each model once per split and caching its logits;
- `system`: the whole evaluation (router + baselines) from cached logits, as the report's dictionary;
- `report`: report.json, report.md and pareto.png.
"""
