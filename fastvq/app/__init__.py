"""The application: the `fastvq` command (`cli`, the only module that knows its flags), run
configuration and presets (`config`), the training loop (`training`, `step`, `state`), evaluation
and tokenization (`evaluation`, `metrics`), data, checkpoints, the device, and reports and plots."""
