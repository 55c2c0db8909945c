"""Actor-critic RL for continuous allocations: DDPG (MLP actor) and G-DDPG (diffusion actor)."""
