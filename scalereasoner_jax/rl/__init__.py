"""Reinforcement learning: rewards, GRPO-family advantages and losses (sampler and trainer build on these)."""
