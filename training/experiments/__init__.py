"""Controlled experiments: the statistics of user-randomized tests (`stats`) and off-policy
evaluation of a candidate ranking policy on logged exposures (`ope`). Numpy and scipy only."""
