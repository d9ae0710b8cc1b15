"""The first N test images of a run's data as PNG files in folders named after their classes.

    python benchmarks/write_test_images.py --run runs/demo --out runs/demo_images --count 200

What `edge`, `route` and the deployment benchmarks read (`edge` reports accuracy from the folder names).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="pipeline run folder")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--count", type=int, default=200, help="how many test images")
    args = parser.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"error: {args.out} exists")
    from PIL import Image

    from askexpert.pipeline.finished_run import read_settings
    from datamodules.datamodule import ImageDataModule

    datamodule = ImageDataModule(**read_settings(args.run).data.as_dict())
    pixels, labels = datamodule.tensors("test")[:2]
    for i in range(min(args.count, len(labels))):
        folder = os.path.join(args.out, datamodule.class_names[int(labels[i])])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.png"))
    print(f"{min(args.count, len(labels))} test images of {args.run} -> {args.out}")


if __name__ == "__main__":
    main()
