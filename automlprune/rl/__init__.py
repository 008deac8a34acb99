"""Deep-RL layer-width search: the Gymnasium environment and the stable-baselines3 agents."""
