"""Collaborative inference: routing the generalist's unsure samples to experts, and what that costs.

- `routing`: confidence gates, temperature scaling, top-k expert selection and answer fusion, and `decide`, the
  one place logits become a routing decision (evaluation, `route`, `export` and `edge` all use it);
- `costs`: device/link profiles and the per-sample latency and energy model;
- `budgets`: the limits an operating point may have;
- `sweep`: accuracy/offload/latency/energy for every threshold at once, and the operating point;
- `logits`: running a model over many images (`batched_logits`), and each model once per split with its logits
  cached;
- `system`: the whole evaluation (router + baselines) from cached logits, as the report's dictionary;
- `evaluation`: a run folder's models as cached logits, wired into the system, and the report dictionary;
- `sanity`: the warnings that open a report;
- `report`: report.json, report.md and pareto.png.
"""
