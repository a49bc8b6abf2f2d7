"""batchscope for training loops other people wrote: a Lightning callback and a Hugging Face TrainerCallback.

    from trainer.integrations.lightning import BatchscopeCallback     # pip install 'batchscope[lightning]'
    from trainer.integrations.hf import BatchscopeCallback            # pip install 'batchscope[hf]'

Each module imports its framework when imported, never this package: the core needs neither library.
Both log one `steps` row per optimizer step (loss, lr, batch size, examples or tokens) with the noise-
scale ingredients from `trainer.noise.GradientNoise`, the framework's evaluations, and end the run
finished or failed. docs/own-loop.md has complete examples for these and for a plain loop.
"""
