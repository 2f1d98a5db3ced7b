"""Reinforcement learning from rewards (GRPO and its variants): the parts that do not depend on the trainer.

``loss`` holds the math (group advantages, the clipped surrogate, the KL estimator, the variants'
normalisations), ``rewards`` loads and checks reward functions, ``rollout`` samples groups of
completions with the recurrent decoder and computes the same log-probabilities teacher-forced.
"""
