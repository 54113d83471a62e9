"""Launchers that start the ranks themselves (beside torchrun, accelerate and deepspeed, which
start them from outside): Ray Train. Every launcher ends in ``mpc_dist.train.train``."""
