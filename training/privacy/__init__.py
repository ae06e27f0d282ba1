"""Privacy: user-level DP-SGD (`dp.py`, Opacus), the audit's user holdout (`holdout.py`) and the
membership-inference audit (`audit.py`)."""
