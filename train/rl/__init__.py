"""The GRPO learner's parts, one job each: `config` (GRPOConfig, prompt sources),
`sources` (prompt files, the mixture of sources), `rewards` (the run's reward functions,
reward models loaded for it, and the scores of completions), `rollout` (groups sampled
with the step's parameters, rows -> training batch), `loss` (the clipped objective) and
`metrics` (rollout and per-source figures, the reward-hacking guard). The learner that
wires them is `train/stages/grpo.py`."""
