"""The learning rate each training mode uses unless `--lr` is given, chosen by measurement.

Measured by `python -m benchmarks defaults` (benchmarks/bench_defaults.py): MiniLM fine-tuned
on man-sections (5 classes of manual pages) for 3 epochs, seed 0, at several rates per mode;
the table is in benchmarks/RESULTS.md and the README. Plain data, no imports: the CLI's
`--help` shows it without importing torch.
"""

from __future__ import annotations

#: Peak learning rate per mode: the best eval accuracy of the sweep for the MPO modes (lightweight
#: 0.886 at 3e-4, against 0.595 at 2e-5 and 0.214 at 3e-3; overparam 0.889 at 1e-4), the usual
#: BERT rate for dense `full` (0.771), the reference the others are compared with.
DEFAULT_LR: dict[str, float] = {
    "full": 2e-5,
    "lightweight": 3e-4,
    "overparam": 1e-4,
}


def default_lr_help() -> str:
    """`full 2e-05, lightweight 0.0003, ...`: the defaults as `--help` shows them."""
    return ", ".join(f"{mode} {lr:g}" for mode, lr in DEFAULT_LR.items())
