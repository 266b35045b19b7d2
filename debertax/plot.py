"""Plot the loss curves of one or more runs from their metrics.jsonl into a PNG.

    python -m debertax.plot W1/metrics.jsonl [W2/metrics.jsonl ...] --output=losses.png [--labels=gdes,es]
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from debertax import storage
from debertax.metric_writer import read_jsonl

PANELS = (("mlm_loss", "generator MLM loss"), ("rtd_loss", "discriminator RTD loss"),
          ("rtd_auc", "RTD AUC (eval)"), ("cosine_E_D", "avg. cosine sim. of E_D (eval)"))


def plot(paths: list[str], output: str, labels: list[str] | None = None) -> str:
  import matplotlib
  matplotlib.use("Agg")  # No display on servers.
  import matplotlib.pyplot as plt

  labels = labels or [os.path.basename(storage.dirname(storage.absolute(p))) or p for p in paths]
  if len(labels) != len(paths):
    raise ValueError(f"{len(labels)} labels for {len(paths)} metrics files")
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
  for path, label in zip(paths, labels):
    if not storage.exists(path):
      raise FileNotFoundError(f"{path}: no such metrics file")
    records = read_jsonl(path)
    for ax, (key, title) in zip(axes, PANELS):
      for split, style in (("train", "-"), ("eval", "o--")):
        points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
        if points:
          steps, values = zip(*sorted(points))
          ax.plot(steps, values, style, label=f"{label} ({split})", markersize=3)
      ax.set_title(title)
      ax.set_xlabel("step")
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, dpi=100, format=os.path.splitext(output)[1][1:] or "png")
  plt.close(fig)
  storage.write_atomic(output, image.getvalue())
  return output


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m debertax.plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("metrics", nargs="+", help="metrics.jsonl files")
  parser.add_argument("--output", default="losses.png")
  parser.add_argument("--labels", default=None, help="comma-separated, one per file")
  args = parser.parse_args(argv)
  try:
    print(plot(args.metrics, args.output, args.labels.split(",") if args.labels else None))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
