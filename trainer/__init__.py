"""batchscope's trainer: batch-size experiments with the gradient noise scale measured on every run.

    python -m trainer --batch 32 --lr 0.1          one run of the default task (digits)
    python -m trainer sweep --batch 8,16,32 --lr 0.01:1:5

Modules: cli (command line), config (options, validation, schedules), tasks + datasets (data and
models), train (the loop), step (gradients and micro-batch statistics), gns (the estimators, pure math),
steplog (device-side statistics handed to the collector in blocks), sweep (grids as subprocesses).
"""
