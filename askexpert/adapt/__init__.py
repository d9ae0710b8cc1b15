"""`python -m askexpert adapt`: the edge generalist learns from its experts' answers, round after round.

A deployment is simulated as a stream of unlabelled images cut into rounds (`stream.py`), or read from what an
edge client recorded (`record.py`). In each round the system answers the round's images and keeps the offloaded
ones with the expert's class probabilities; between rounds the generalist is distilled on everything kept so far
with a replay share of its own training data (`distill.py`), and τ is chosen again on validation. Every round is
measured on the run's fixed test split (`measure.py`); `rounds.py` runs, records and resumes the rounds,
`state.py` keeps the folder (settings, finished rounds), `table.py` writes adapt.csv and adapt.png, and
`reexport.py` puts the adapted generalist into an export folder under a new version. docs/adapt.md tells the
whole story.
"""
