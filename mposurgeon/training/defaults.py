"""The learning rate each training mode uses unless `--lr` is given, chosen by measurement.

Measured by `python -m benchmarks defaults` (benchmarks/bench_defaults.py): MiniLM fine-tuned
on man-sections (5 classes of manual pages) for 3 epochs, seed 0, at several rates per mode;
the table is in benchmarks/RESULTS.md and the README. Plain data, no imports: the CLI's
`--help` shows it without importing torch.
"""

from __future__ import annotations

#: Peak learning rate per mode. Dense `full` fine-tuning takes the usual BERT rate; the MPO
#: modes train far fewer, or reparametrized, weights and need larger steps.
DEFAULT_LR: dict[str, float] = {
    "full": 2e-5,
    "lightweight": 1e-3,
    "overparam": 1e-4,
}


def default_lr_help() -> str:
    """`full 2e-05, lightweight 0.001, ...`: the defaults as `--help` shows them."""
    return ", ".join(f"{mode} {lr:g}" for mode, lr in DEFAULT_LR.items())
