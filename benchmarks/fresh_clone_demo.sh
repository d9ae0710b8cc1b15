#!/usr/bin/env bash
# Do two fresh clones print the same demo numbers? (issue 13: the README's headline table is what a fresh clone
# prints.)
#     bash benchmarks/fresh_clone_demo.sh [WORKDIR]      # about 15 min on 2 CPU cores, installs included
# Clones the committed HEAD of this repository twice into WORKDIR (default: a new temporary folder), runs the
# README's `make demo` in each (each with its own fresh .venv, as a new user would), then compares the two
# runs' report.json with only what must differ left out (the clone's paths and the wall time). It prints the
# first clone's headline table, the wall time of each demo, and exits non-zero when the numbers differ.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/askexpert-fresh-XXXXXX)}
mkdir -p "$work"
revision=$(git -C "$repo" rev-parse --short HEAD)
echo "revision $revision; clones in $work"
for name in clone1 clone2; do
    rm -rf "${work:?}/$name"
    git clone -q "$repo" "$work/$name"
    git -C "$work/$name" checkout -q "$revision"
    start=$SECONDS
    make -C "$work/$name" -s install >/dev/null
    installed=$SECONDS
    make -C "$work/$name" -s demo >"$work/$name.log" 2>&1
    echo "$name: install $((installed - start)) s, make demo $((SECONDS - installed)) s"
done
"$work/clone1/.venv/bin/python" - "$work/clone1/runs/demo/report.json" "$work/clone2/runs/demo/report.json" <<'EOF'
import json
import sys

from askexpert.collab.report import findings_lines, headline_table


def numbers(path):
    clone = path.rsplit("/runs/demo/", 1)[0]
    report = json.loads(open(path).read().replace(clone, "CLONE"))  # each clone's own folder
    report.pop("provenance")  # the clone's paths, revision and packages
    return report


first, second = (numbers(path) for path in sys.argv[1:3])
report = json.load(open(sys.argv[1]))
print("\n".join([*findings_lines(report), headline_table(report)]))
if first != second:
    different = sorted(key for key in first if first[key] != second.get(key))
    print(f"the two fresh clones DIFFER in: {', '.join(different)}")
    sys.exit(1)
print("the two fresh clones printed identical reports (provenance aside)")
EOF
